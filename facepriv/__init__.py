"""facepriv: protect face photos from face recognition, and audit the protection."""

__version__ = "0.1.0"
