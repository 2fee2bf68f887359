"""``facepriv protect`` (being written)."""
HELP = "Protect photos against face recognition."


def protect():
    raise NotImplementedError
