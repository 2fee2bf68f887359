"""The installed dependencies have what facepriv and its tests use (pins in pyproject.toml)."""

from __future__ import annotations

from pathlib import Path

import pytest

PIN = "opencv-python-headless>=5.0,<5.1"
WHY = (f"pin {PIN} (the dev extra of pyproject.toml does; `pip install -e .[dev]` again): the facenet-casia "
       "parity tests read its TensorFlow graph with cv2.dnn.readNetFromTensorflow, which OpenCV 5.1 removed "
       "and on which 4.10-4.14 stop (graph_simplifier assertion)")


def _version(text: str) -> tuple[int, int]:
    major, minor = text.split(".")[:2]
    return int(major), int(minor)


def test_opencv_has_the_tensorflow_importer():
    import cv2

    assert hasattr(cv2, "dnn") and hasattr(cv2.dnn, "readNetFromTensorflow"), (
        f"OpenCV {cv2.__version__} has no cv2.dnn.readNetFromTensorflow: {WHY}")


def test_opencv_is_a_release_that_reads_the_facenet_graph():
    import cv2

    assert not (4, 10) <= _version(cv2.__version__) < (5, 0), (
        f"OpenCV {cv2.__version__} cannot read facenet-casia's graph: {WHY}")


def test_pyproject_pins_opencv_for_the_parity_tests():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert PIN in project["optional-dependencies"]["dev"]
    assert [d for d in project["dependencies"] if d.startswith("opencv")] == ["opencv-python-headless>=4.8"]
