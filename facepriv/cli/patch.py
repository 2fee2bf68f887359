"""``facepriv patch`` (being written)."""
import typer

app = typer.Typer(help="Adversarial patches.", no_args_is_help=True)
