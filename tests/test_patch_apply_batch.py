"""facepriv patch apply: the generator batched across photos (read-ahead), per-file isolation."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import fixture_path
from facepriv.core.align import TEMPLATES
from facepriv.core.faces import Face, FacePolicy
from facepriv.core.photo import SaveOptions
from facepriv.patch import PatchApplier, PatchApplyConfig, run_patch_apply
from test_patch import _noisy_generator


class _TwoFaceDetector:
    """Two faces per photo at fixed, plausible places (no model); none in tiny images."""

    name = "two-fake"

    def __init__(self):
        self.calls = 0

    def detect(self, rgb):
        self.calls += 1
        h, w = rgb.shape[:2]
        if min(h, w) < 100:
            return []
        pts = torch.tensor(TEMPLATES["arcface-112"].points)
        out = []
        for s, (cx, cy) in ((min(h, w) / 200.0, (w / 3, h / 3)), (min(h, w) / 320.0, (2 * w / 3, h / 2))):
            p = pts * s + torch.tensor([cx - 56 * s, cy - 56 * s])
            box = np.array([cx - 56 * s, cy - 56 * s, cx + 56 * s, cy + 56 * s], np.float32)
            out.append(Face(box, p.numpy().astype(np.float32), 0.99))
        return out


@pytest.fixture
def photos(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    for n in ("obama.jpg", "biden.jpg", "group.jpg", "obama2.jpg"):
        shutil.copy(fixture_path(n), d / n)
    (d / "c_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg" * 10)  # sorted among the others
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(d / "d_tiny.png")  # no face: copied through
    return d


def _run(photos, out, gen_dir, photo_batch, **kw):
    return run_patch_apply([photos], out, PatchApplyConfig(generator=str(gen_dir), photo_batch=photo_batch,
                                                           **kw.pop("cfg", {})),
                           policy=FacePolicy(min_face_size=10), save=SaveOptions(), output_suffix=".png",
                           progress=False, detector=kw.pop("detector", _TwoFaceDetector()), **kw)


def _rows(out):
    return {json.loads(r)["input"]: json.loads(r) for r in (out / "manifest.jsonl").read_text().splitlines()}


def test_batched_apply_equals_one_photo_at_a_time_and_isolates_a_corrupt_file(tmp_path, photos, monkeypatch):
    gen_dir = _noisy_generator(tmp_path)
    calls = []
    real = PatchApplier.apply_many

    def counting(self, images, landmarks):
        calls.append(len(images))
        return real(self, images, landmarks)

    monkeypatch.setattr(PatchApplier, "apply_many", counting)
    single = _run(photos, tmp_path / "one", gen_dir, 1)
    assert calls == [1, 1, 1, 1]  # one generator call per photo with faces
    calls.clear()
    batched = _run(photos, tmp_path / "all", gen_dir, 16)
    assert calls == [4]  # the faces of all four photos in one call
    calls.clear()
    windowed = _run(photos, tmp_path / "three", gen_dir, 3)
    assert sum(calls) == 4 and len(calls) == 2  # windows of 3 items (the broken file takes a slot)

    for s in (single, batched, windowed):
        assert s.counts == {"ok": 4, "error": 1, "copied": 1}
        assert [p for p, _ in s.failures] == [str((photos / "c_broken.jpg").resolve())]
    names = ["obama.png", "biden.png", "group.png", "obama2.png", "d_tiny.png"]
    for name in names:
        a = np.asarray(Image.open(tmp_path / "one" / name)).astype(int)
        for other in ("all", "three"):
            b = np.asarray(Image.open(tmp_path / other / name)).astype(int)
            # same pixels; a batched convolution may round a value on the other side of .5 (1 level)
            assert np.abs(a - b).max() <= 1 and (a != b).mean() < 1e-4, (name, other)
    # the patch went in, and the photo with no face was copied through unchanged
    orig = np.asarray(Image.open(photos / "obama.jpg").convert("RGB")).astype(int)
    assert (np.abs(np.asarray(Image.open(tmp_path / "all" / "obama.png")).astype(int) - orig) > 0).mean() > 0.005
    assert np.array_equal(np.asarray(Image.open(tmp_path / "all" / "d_tiny.png")), np.full((40, 40, 3), 128, np.uint8))
    assert not (tmp_path / "all" / "c_broken.png").exists()
    rows = _rows(tmp_path / "all")
    assert len(rows) == 6
    broken = rows[str((photos / "c_broken.jpg").resolve())]
    assert broken["status"] == "error" and broken["error"]
    ok = rows[str((photos / "group.jpg").resolve())]
    assert ok["status"] == "ok" and ok["faces"] == 2 and ok["mode"] == "evasion"
    assert {"load_s", "detect_s", "edit_s", "save_s"} <= set(ok["timings"])

    # resume: finished files are skipped, the broken one is tried again (alone)
    calls.clear()
    det = _TwoFaceDetector()
    again = _run(photos, tmp_path / "all", gen_dir, 16, resume=True, detector=det)
    assert again.resumed == 5 and again.counts == {"error": 1} and calls == [] and det.calls == 0
    # the read-ahead settings do not change the settings hash: resuming with another batch size works
    again = _run(photos, tmp_path / "all", gen_dir, 2, resume=True, cfg={"batch_size": 1})
    assert again.resumed == 5


def test_batched_apply_with_a_target_and_an_interrupted_batch(tmp_path, photos, monkeypatch):
    """Impersonation through the batched path; Ctrl-C while reading ahead leaves no output behind
    for the unfinished photos and the run resumes."""
    gen_dir = _noisy_generator(tmp_path)
    target = tmp_path / "target.jpg"
    shutil.copy(fixture_path("biden.jpg"), target)
    (photos / "c_broken.jpg").unlink()
    s = _run(photos, tmp_path / "imp", gen_dir, 8, cfg={"target": str(target)})
    assert s.counts == {"ok": 4, "copied": 1}
    assert {r["mode"] for r in _rows(tmp_path / "imp").values()} == {"impersonation"}
    ev = np.asarray(Image.open(tmp_path / "imp" / "biden.png")).astype(int)
    s2 = _run(photos, tmp_path / "ev", gen_dir, 8)
    assert s2.counts == {"ok": 4, "copied": 1}
    assert not np.array_equal(ev, np.asarray(Image.open(tmp_path / "ev" / "biden.png")).astype(int))

    class Interrupting(_TwoFaceDetector):
        def detect(self, rgb):
            if self.calls == 3:  # while reading ahead the second window
                raise KeyboardInterrupt
            return super().detect(rgb)

    # items in order: biden, d_tiny | group, obama (interrupted here) | obama2
    s3 = _run(photos, tmp_path / "int", gen_dir, 2, detector=Interrupting())
    assert s3.interrupted and s3.counts == {"ok": 1, "copied": 1}
    assert sorted(p.name for p in (tmp_path / "int").iterdir() if p.suffix == ".png") == ["biden.png", "d_tiny.png"]
    assert not [p for p in (tmp_path / "int").iterdir() if "part" in p.name or p.name.startswith(".")]
    s4 = _run(photos, tmp_path / "int", gen_dir, 2, resume=True)
    assert s4.resumed == 2 and s4.counts == {"ok": 3}
