"""``python -m facepriv`` (also what ``accelerate launch -m facepriv`` runs)."""

from .cli import main

if __name__ == "__main__":
    main()
