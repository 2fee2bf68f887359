"""The AWS Rekognition adapter with stand-ins for boto3's client: similarities, retried
throttling, a stopped adapter, an install hint without boto3, and InvalidParameterException
taken for "no face" only when it is one.
"""

from __future__ import annotations

import hashlib

import pytest

from facepriv.audit.apis.rekognition import Rekognition, says_no_face

from .api_mocks import ClientError, FakeRekognition
from .helpers import noise_image


def test_rekognition_adapter_with_fake_client(images, tmp_path):
    client = FakeRekognition(images)
    api = Rekognition(client=client, cache=False, rate=None, backoff=0.001, sleep=lambda s: None)
    assert api.compare(images["alice1"], images["alice2"]).score == 99.2
    client.errors = [ClientError("ThrottlingException"), ClientError("ProvisionedThroughputExceededException")]
    r = api.compare(images["alice1"], images["bob"])
    assert r.score == 3.5 and r.verified("default") is False and r.attempts == 3
    nf = api.compare(images["empty"], images["bob"])
    assert nf.no_face and nf.no_face_in == 1
    client.errors = [ClientError("UnrecognizedClientException", 403)]
    bad = api.compare(images["alice1"], images["alice2"])
    assert not bad.ok and bad.code == "UnrecognizedClientException"
    calls = client.calls
    assert not api.compare(images["alice1"], images["alice2"]).ok and client.calls == calls  # adapter stopped


def test_rekognition_without_boto3_says_how_to_install(monkeypatch):
    import builtins

    from facepriv.core.errors import ConfigError

    real = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "boto3":
            raise ImportError("no boto3")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ConfigError, match=r"facepriv\[aws\]"):
        Rekognition(cache=False)


# ------------------------------------------------------------------------------ InvalidParameterException
class _MessageClientError(Exception):
    def __init__(self, code, message, status=400):
        super().__init__(message)
        self.response = {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}}


GENERIC = "Request has invalid parameters"
NO_FACES = "There are no faces in the image. Should be at least 1."


class _Rekognition:
    """boto3 Rekognition stand-in. ``faces``: image sha256 -> number of faces. CompareFaces answers
    InvalidParameterException (with ``message``) when the source has no face or is marked ``invalid``."""

    def __init__(self, faces: dict[str, int], *, message: str = GENERIC, detect: bool = True,
                 detect_error: Exception | None = None):
        self.faces, self.message = faces, message
        self.invalid: set[str] = set()
        self.detect_error = detect_error
        self.compares = self.detects = 0
        if detect:
            self.detect_faces = self._detect_faces

    def compare_faces(self, SourceImage, TargetImage, SimilarityThreshold):  # noqa: N803 - boto3's names
        self.compares += 1
        a, b = (hashlib.sha256(x["Bytes"]).hexdigest() for x in (SourceImage, TargetImage))
        if a in self.invalid:
            raise _MessageClientError("InvalidParameterException", GENERIC)
        if self.faces[a] == 0:
            raise _MessageClientError("InvalidParameterException", self.message)
        if self.faces[b] == 0:
            return {"FaceMatches": [], "UnmatchedFaces": [], "SourceImageFace": {"Confidence": 99.0}}
        return {"FaceMatches": [{"Similarity": 97.5}], "UnmatchedFaces": [], "SourceImageFace": {"Confidence": 99.0}}

    def _detect_faces(self, Image):  # noqa: N803
        self.detects += 1
        if self.detect_error is not None:
            raise self.detect_error
        return {"FaceDetails": [{"Confidence": 99.0}] * self.faces[hashlib.sha256(Image["Bytes"]).hexdigest()]}


@pytest.fixture
def rek_images(tmp_path):
    paths = {n: noise_image(tmp_path / f"{n}.jpg", 96, 96, seed=s, fmt="JPEG") for n, s in (("a", 1), ("b", 2), ("none", 3))}
    faces = {hashlib.sha256(p.read_bytes()).hexdigest(): (0 if n == "none" else 1) for n, p in paths.items()}
    return paths, faces


def _rek(client) -> Rekognition:
    return Rekognition(client=client, cache=False, rate=None, retries=0, sleep=lambda s: None)


def test_rekognition_invalid_parameter_with_faces_in_both_images_is_an_error(rek_images):
    paths, faces = rek_images
    client = _Rekognition(faces)
    client.invalid.add(hashlib.sha256(paths["a"].read_bytes()).hexdigest())
    api = _rek(client)
    res = api.compare(paths["a"], paths["b"])
    assert not res.ok and not res.no_face and res.code == "InvalidParameterException"
    assert GENERIC in res.error and "DetectFaces finds a face in both images" in res.error
    assert client.detects == 2 and api.stats["errors"] == 1
    # the same generic answer for a source without a face: DetectFaces says which image
    nf = api.compare(paths["none"], paths["b"])
    assert nf.no_face and nf.no_face_in == 1 and client.detects == 3
    # a target without a face: empty matches, no DetectFaces needed
    nf2 = api.compare(paths["b"], paths["none"])
    assert nf2.no_face and nf2.no_face_in == 2 and client.detects == 3
    assert api.compare(paths["b"], paths["a"]).score == 97.5


def test_rekognition_without_detect_faces_trusts_only_an_explicit_message(rek_images):
    paths, faces = rek_images
    generic = _rek(_Rekognition(faces, detect=False)).compare(paths["none"], paths["b"])
    assert not generic.no_face and generic.code == "InvalidParameterException"  # not counted towards PSR
    explicit = _rek(_Rekognition(faces, message=NO_FACES, detect=False)).compare(paths["none"], paths["b"])
    assert explicit.no_face and explicit.no_face_in is None  # which image is unknown: never "protected photo"
    assert says_no_face(NO_FACES) and not says_no_face(GENERIC)
    assert not says_no_face("Image size is too small") and says_no_face("No face detected in the source image")


def test_rekognition_detect_faces_refused_does_not_stop_the_adapter(rek_images):
    paths, faces = rek_images
    client = _Rekognition(faces, detect_error=_MessageClientError("AccessDeniedException", "not authorized", 403))
    api = _rek(client)
    res = api.compare(paths["none"], paths["b"])
    assert not res.no_face and res.code == "InvalidParameterException" and "could not check" in res.error
    assert api.compare(paths["a"], paths["b"]).score == 97.5  # still working (not fatal)
    api.compare(paths["none"], paths["b"])
    assert client.detects == 1  # refused once: not asked again
