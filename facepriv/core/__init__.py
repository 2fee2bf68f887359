"""Shared core: image I/O, batch runner, faces (detection, alignment, paste-back), devices."""
