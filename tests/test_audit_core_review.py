"""Review of `facepriv audit` (issue 5), core part: error messages keep their brackets, the
thresholds file keeps calibration notes and says when it has no entry, calibration without
impostor/genuine pairs is a usage error, best_accuracy in O(n log n), tiny images are upscaled
to the provider's minimum side, Rekognition's InvalidParameterException is only "no face" when
it is one, and a missing --protected / --original folder names its option.
"""

from __future__ import annotations

import email.parser
import email.policy
import hashlib
import http.server
import io
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch.nn as nn
import typer
from PIL import Image
from typer.testing import CliRunner

from facepriv.audit.apis.base import APIError, ImageLimits, prepare_image
from facepriv.audit.apis.facepp import FacePlusPlus
from facepriv.audit.apis.rekognition import Rekognition, says_no_face
from facepriv.audit.inputs import match_files
from facepriv.models.thresholds import (FARS, best_accuracy, calibrate_scores, calibration_record,
                                       resolve_thresholds)
from facepriv.core.errors import ConfigError


@pytest.fixture(autouse=True)
def _private(tmp_path, monkeypatch):
    monkeypatch.setenv("FACEPRIV_THRESHOLDS_DIR", str(tmp_path / "thresholds"))
    monkeypatch.setenv("FACEPRIV_OFFLINE", "1")


class MeanColour(nn.Module):
    """A fake recogniser: the embedding of a crop is the mean RGB of its centre."""

    def __init__(self, name: str = "mean-colour"):
        super().__init__()
        self.spec = type("S", (), {"template": "arcface-112", "input_size": (112, 112), "metric": "cosine",
                                   "name": name, "thresholds": {}, "threshold_source": None,
                                   "architecture": "mean colour", "runtime": "torch"})()

    def forward(self, x):
        return x[:, :, 28:84, 28:84].mean((2, 3))


def _solid(path: Path, rgb, size: int = 112) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), rgb, dtype=np.uint8)).save(path)
    return path


def _noise(path: Path, w: int, h: int, seed: int = 0, fmt: str = "PNG") -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, format=fmt)
    return path


# ------------------------------------------------------------------------------ B: brackets
def _failing_app(exc: Exception) -> typer.Typer:
    from facepriv.cli.common import handle_errors

    app = typer.Typer()

    @app.command()
    @handle_errors
    def run():
        raise exc

    return app


@pytest.mark.parametrize("exc, code, shown", [
    (ConfigError("AWS Rekognition needs boto3: pip install 'facepriv[aws]'; or the [facepp] section of the file"),
     2, "AWS Rekognition needs boto3: pip install 'facepriv[aws]'; or the [facepp] section of the file"),
    (RuntimeError("[bold]not markup[/bold] :smile: [/]"), 1, "RuntimeError: [bold]not markup[/bold] :smile: [/]"),
])
def test_error_messages_print_brackets_verbatim(exc, code, shown):
    res = CliRunner().invoke(_failing_app(exc), [])
    assert res.exit_code == code
    assert f"error: {shown}" in res.output


def test_batch_summary_failures_print_brackets_verbatim(capsys, monkeypatch):
    from types import SimpleNamespace

    from facepriv.cli import common

    monkeypatch.setattr(common.out_console, "width", 300)
    summary = SimpleNamespace(counts={"error": 1}, no_face={}, resumed=0, elapsed=1.0,
                              failures=[("in/[x] photo.jpg", "cannot read [red]this[/red] file\nsecond line")],
                              manifest=Path("out/[run]/manifest.jsonl"))
    common.print_batch_summary(summary, "t")
    out = capsys.readouterr().out
    assert "in/[x] photo.jpg: cannot read [red]this[/red] file" in out and "second line" not in out
    assert "manifest: out/[run]/manifest.jsonl" in out


# ------------------------------------------------------------------------------ E: thresholds file
def _calibration_file(tmp_path: Path, model: str, single: bool) -> Path:
    cal = calibrate_scores([0.9, 0.8, 0.85], [0.1, 0.2], default_threshold=0.5)
    assert "only 2 impostor pairs" in cal["note"]
    rec = calibration_record(model, cal, pairs_file=tmp_path / "pairs.csv")
    f = tmp_path / ("one.json" if single else "all.json")
    f.write_text(json.dumps(rec if single else {"models": {model: rec}}))
    return f


@pytest.mark.parametrize("single", [True, False])
def test_thresholds_file_keeps_the_calibration_note(tmp_path, single):
    f = _calibration_file(tmp_path, "mean-colour", single)
    ts = resolve_thresholds("mean-colour", spec=MeanColour().spec, file=f)
    assert ts.kind == "file" and "only 2 impostor pairs" in ts.note and set(ts.values) == set(FARS)
    assert ts.to_json()["note"] == ts.note


def test_thresholds_file_without_the_model_says_which_source_is_used(tmp_path):
    from facepriv.models.thresholds import _read_threshold_file

    f = tmp_path / "th_other.json"
    f.write_text(json.dumps({"dlib-resnet": {"1e-1": -0.7, "1e-2": -0.6, "1e-3": -0.5}}))
    toy = MeanColour("toy-fr")
    toy.spec.thresholds = {"default": 0.363}  # no FAR values -> its default threshold
    ts = resolve_thresholds("toy-fr", spec=toy.spec, file=f)
    assert ts.kind == "default"
    assert ts.note.startswith("the thresholds file th_other.json has no entry for toy-fr (it has: dlib-resnet), so "
                              "the default thresholds are used instead (default:")
    assert "NOT FAR-calibrated" in ts.note  # the fallback's own warning is kept
    # the runner passes the parsed file as file_data too: same note
    same = resolve_thresholds("toy-fr", spec=toy.spec, file=f, file_data=_read_threshold_file(f))
    assert same.note == ts.note
    # sface ships FAR thresholds (calibrated on LFW): those are named instead
    sf = resolve_thresholds("sface", file=f)
    assert sf.kind == "protocol" and "so the protocol thresholds are used instead (protocol:" in sf.note
    # no thresholds at all for a model the file lacks: still said, and why
    none = resolve_thresholds("mean-colour", spec=MeanColour().spec, file=f)
    assert none.kind == "none" and "no entry for mean-colour" in none.note and "no thresholds are used" in none.note
    # a model the file has: no such note
    assert resolve_thresholds("dlib-resnet", file=f).note is None


def test_audit_with_thresholds_file_reports_both_notes(tmp_path):
    from facepriv.audit import AuditConfig, run_audit

    orig, prot = tmp_path / "orig", tmp_path / "prot"
    _solid(orig / "a.png", (200, 40, 40))
    _solid(prot / "a.png", (40, 40, 200))
    f = _calibration_file(tmp_path, "mean-colour", single=False)
    cfg = AuditConfig(protected=prot, original=orig, models=["mean-colour", "other-colour"], aligned=True,
                      quality=False, progress=False, device="cpu", thresholds=f)
    rep = run_audit(cfg, recognizers={"mean-colour": MeanColour(), "other-colour": MeanColour("other-colour")})
    notes = " | ".join(rep["protocol_notes"])
    assert "only 2 impostor pairs" in notes
    assert "the thresholds file all.json has no entry for other-colour" in notes
    assert rep["thresholds"]["mean-colour"]["kind"] == "file"


# ------------------------------------------------------------------------------ H: calibration
def test_calibration_without_impostor_or_genuine_pairs_is_a_usage_error():
    with pytest.raises(ConfigError, match=r"1 genuine and 0 impostor.*different people \(label different\)"):
        calibrate_scores([0.9], [])
    with pytest.raises(ConfigError, match=r"0 genuine and 2 impostor.*same person \(label same\)"):
        calibrate_scores([], [0.1, 0.2])


def test_cli_calibrate_with_only_same_pairs_exits_2_with_a_plain_message(tmp_path, monkeypatch):
    from facepriv.audit import runner
    from facepriv.cli import app

    root = tmp_path / "imgs"
    _solid(root / "a1.png", (200, 40, 40))
    _solid(root / "a2.png", (190, 60, 50))
    _solid(root / "b1.png", (40, 40, 200))
    pairs = root / "pairs.csv"
    pairs.write_text("a1.png,a2.png,same\na2.png,a1.png,same\n")
    monkeypatch.setattr(runner, "load_recognizers", lambda names, device: {"mean-colour": MeanColour()})
    res = CliRunner().invoke(app, ["-q", "audit", "calibrate", "--pairs", str(pairs), "--models", "mean-colour",
                                   "--aligned", "--no-store"])
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert "error: calibration needs both genuine and impostor pairs" in text
    assert "pairs.csv (2 same / 0 different pairs) gave 2 genuine and 0 impostor" in text
    assert "ValueError" not in text and "Traceback" not in text
    # pairs left out (here: an unreadable photo) are counted in the message
    (root / "bad.png").write_bytes(b"not an image")
    pairs.write_text("a1.png,a2.png,same\na1.png,bad.png,different\n")
    res = CliRunner().invoke(app, ["-q", "audit", "calibrate", "--pairs", str(pairs), "--models", "mean-colour",
                                   "--aligned", "--no-store"])
    text = " ".join(res.output.split())
    assert res.exit_code == 2, res.output
    assert "(1 same / 1 different pairs (0 pair(s) left out without a detected face, 1 unreadable)) gave 1 genuine " \
           "and 0 impostor" in text


def _best_accuracy_quadratic(genuine, impostor):
    """The previous O(n^2) definition, kept here as the reference."""
    g, i = np.asarray(genuine, dtype=np.float64), np.asarray(impostor, dtype=np.float64)
    cand = np.unique(np.concatenate([g, i]))
    mids = np.r_[cand[0] - 1e-6, (cand[:-1] + cand[1:]) / 2, cand[-1] + 1e-6]
    accs = np.array([((g >= t).sum() + (i < t).sum()) / (len(g) + len(i)) for t in mids])
    j = int(np.argmax(accs))
    return float(accs[j]), float(mids[j])


def test_best_accuracy_matches_the_quadratic_definition_with_ties():
    rng = np.random.default_rng(7)
    cases = [([0.5], [0.5]), ([1.0], []), ([], [0.2, 0.2]), ([0.3, 0.3, 0.3], [0.3, 0.3]), ([0.9, 0.1], [0.5])]
    for k in range(60):
        ng, ni = int(rng.integers(1, 120)), int(rng.integers(1, 160))
        g, i = rng.normal(1.0, 1.0, ng), rng.normal(0.0, 1.0, ni)
        if k % 2 == 0:  # many ties, within and across the two sets
            g, i = np.round(g, 1), np.round(i, 1)
        if k % 5 == 0:
            i[: ni // 2] = g[0]
        cases.append((g, i))
    for g, i in cases:
        assert best_accuracy(g, i) == _best_accuracy_quadratic(g, i)
    # large inputs are fine (the quadratic version takes minutes on this)
    g, i = rng.normal(1, 1, 60_000), rng.normal(0, 1, 90_000)
    acc, t = best_accuracy(g, i)
    assert acc == ((g >= t).sum() + (i < t).sum()) / (len(g) + len(i)) and 0.6 < acc < 0.8


# ------------------------------------------------------------------------------ I: tiny images
@pytest.mark.parametrize("w, h, fmt", [(40, 30, "PNG"), (30, 60, "JPEG"), (20, 20, "WEBP")])
def test_tiny_images_are_upscaled_to_the_minimum_side(tmp_path, w, h, fmt):
    p = _noise(tmp_path / f"tiny.{fmt.lower()}", w, h, fmt=fmt)
    limits = ImageLimits(max_bytes=2 * 1024 * 1024, max_side=4096, min_side=48)
    data, note = prepare_image(p, limits)
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG" and min(im.size) == 48
        assert abs(im.size[0] / im.size[1] - w / h) < 0.05  # aspect kept
    assert f"upscaled from {w}x{h} to {im.size[0]}x{im.size[1]} px" in note and "minimum side of 48" in note
    # bytes in, same answer
    assert prepare_image(p.read_bytes(), limits) == (data, note)
    # an image at the minimum is sent as it is
    ok = _noise(tmp_path / "ok.png", 48, 60)
    assert prepare_image(ok, limits) == (ok.read_bytes(), None)


def test_image_that_cannot_reach_the_minimum_side_is_a_bad_image(tmp_path):
    p = _noise(tmp_path / "strip.png", 2000, 10)
    with pytest.raises(APIError, match="2000x10 px.*minimum of 48 px") as err:
        prepare_image(p, ImageLimits(max_side=4096, min_side=48))
    assert err.value.code == "BAD_IMAGE"


class _SizeCheckingFacePP:
    """Face++ compare that enforces the documented 48 px minimum (400 INVALID_IMAGE_SIZE)."""

    def __init__(self):
        self.sizes: list[tuple[int, int]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                    b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n" + body)
                files = {p.get_param("name", header="content-disposition"): p.get_payload(decode=True)
                         for p in msg.iter_parts() if p.get_filename()}
                status, resp = 200, {"request_id": "r", "time_used": 3, "confidence": 88.0,
                                     "thresholds": {"1e-3": 62.3, "1e-4": 69.1, "1e-5": 73.9},
                                     "faces1": [{}], "faces2": [{}]}
                for i in (1, 2):
                    with Image.open(io.BytesIO(files[f"image_file{i}"])) as im:
                        outer.sizes.append(im.size)
                        if min(im.size) < 48:
                            status, resp = 400, {"error_message": f"INVALID_IMAGE_SIZE: image_file{i}"}
                data = json.dumps(resp).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/facepp/v3/compare"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_facepp_gets_tiny_crops_upscaled_and_the_row_says_so(tmp_path):
    server = _SizeCheckingFacePP()
    try:
        tiny, big = _noise(tmp_path / "tiny.png", 40, 40, seed=1), _noise(tmp_path / "big.jpg", 112, 112, 2, "JPEG")
        api = FacePlusPlus("k-123456789", "s-123456789", endpoint=server.url, cache=False, rate=None, retries=0)
        res = api.compare(tiny, big)
        assert res.ok and res.score == 88.0, res.error
        assert server.sizes == [(48, 48), (112, 112)]
        assert res.note.startswith("image 1 upscaled from 40x40 to 48x48 px") and "image 2" not in res.note
        assert res.raw["facepriv_note"] == res.note
    finally:
        server.close()


# ------------------------------------------------------------------------------ J: Rekognition
class _ClientError(Exception):
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
            raise _ClientError("InvalidParameterException", GENERIC)
        if self.faces[a] == 0:
            raise _ClientError("InvalidParameterException", self.message)
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
    paths = {n: _noise(tmp_path / f"{n}.jpg", 96, 96, seed=s, fmt="JPEG") for n, s in (("a", 1), ("b", 2), ("none", 3))}
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
    client = _Rekognition(faces, detect_error=_ClientError("AccessDeniedException", "not authorized", 403))
    api = _rek(client)
    res = api.compare(paths["none"], paths["b"])
    assert not res.no_face and res.code == "InvalidParameterException" and "could not check" in res.error
    assert api.compare(paths["a"], paths["b"]).score == 97.5  # still working (not fatal)
    api.compare(paths["none"], paths["b"])
    assert client.detects == 1  # refused once: not asked again


# ------------------------------------------------------------------------------ K: missing folders
def test_missing_folders_name_their_option(tmp_path):
    _solid(tmp_path / "o" / "a.png", (1, 2, 3))
    with pytest.raises(ConfigError, match=r"^--protected folder nope does not exist$"):
        match_files("nope", tmp_path / "o")
    with pytest.raises(ConfigError, match=r"^--original folder .*missing does not exist$"):
        match_files(tmp_path / "o", tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no images found under the --protected folder"):
        match_files(tmp_path / "empty", tmp_path / "o")


def test_cli_missing_protected_folder(tmp_path, monkeypatch):
    from facepriv.cli import app

    monkeypatch.chdir(tmp_path)
    _solid(tmp_path / "o" / "a.png", (1, 2, 3))
    res = CliRunner().invoke(app, ["-q", "audit", "--protected", "nope", "--original", "o", "--models", "sface",
                                   "--out", "rep"])
    assert res.exit_code == 2 and "error: --protected folder nope does not exist" in res.output
