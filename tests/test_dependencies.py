"""The installed dependencies have what facepriv and its tests use (pins in pyproject.toml)."""

from __future__ import annotations


def test_opencv_has_the_tensorflow_importer():
    import cv2

    assert hasattr(cv2.dnn, "readNetFromTensorflow"), (
        f"OpenCV {cv2.__version__} has no cv2.dnn.readNetFromTensorflow (dropped in OpenCV 5), which the "
        "facenet-casia parity tests read the reference graph with: pin opencv-python-headless>=4.8,<5 "
        "(as pyproject.toml does) and reinstall it")


def test_pyproject_pins_opencv_below_5():
    from pathlib import Path

    import pytest

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    deps = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
    cv = [d for d in deps if d.startswith("opencv-python-headless")]
    assert cv == ["opencv-python-headless>=4.8,<5"]
