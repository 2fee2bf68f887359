"""``facepriv audit`` (being written)."""
import typer

app = typer.Typer(help="Audit protection.", no_args_is_help=True)
