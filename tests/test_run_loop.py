"""One run loop: batch planning (shard, resume, order), the per-photo steps of
core.photo (no-face results, saving an edit) and the detector that never detects an image twice."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from facepriv.core.batch import InputItem, ItemResult, plan_batch, run_batch
from facepriv.core.errors import NoFaceError, ProtectionFailed
from facepriv.core.faces import CachedDetector, Face, FaceDetector, FacePolicy
from facepriv.core.io import load_image
from facepriv.core.photo import (SaveOptions, load_and_detect, no_face_result, no_face_status, process_photo,
                                    save_edited, unprotected_result)


def _photos(root, n):
    root.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n):
        p = root / f"p{i}.png"
        Image.fromarray(np.full((32, 32, 3), 10 * i, np.uint8)).save(p)
        items.append(InputItem(p.resolve(), p.relative_to(root)))
    return items


def _face(x1=4.0):
    lm = np.array([[10, 12], [22, 12], [16, 18], [11, 24], [21, 24]], np.float32)
    return Face(box=np.array([x1, 4, 28, 30], np.float32), landmarks=lm, score=0.99)


class _Counting(FaceDetector):
    def __init__(self, faces):
        self.faces, self.calls, self.batches = faces, 0, 0

    def detect(self, image):
        self.calls += 1
        return list(self.faces)

    def detect_batch(self, images):
        self.batches += 1
        return [list(self.faces) for _ in images]


def _copy(item, dst):
    load_image(item.path).rgb  # noqa: B018 - read it, as a command would
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(item.path.read_bytes())
    return ItemResult(status="ok", output=dst)


# ----------------------------------------------------------------------------- planning
def test_plan_batch_gives_each_rank_its_share_in_order(tmp_path):
    items = _photos(tmp_path / "in", 5)
    plans = [plan_batch(items, tmp_path / "out", {"a": 1}, rank=r, world_size=2) for r in range(2)]
    assert [it.path.name for it in plans[0].todo] == ["p0.png", "p2.png", "p4.png"]
    assert [it.path.name for it in plans[1].todo] == ["p1.png", "p3.png"]
    assert plans[0].shard == plans[0].todo and plans[0].resumed == 0
    single = plan_batch(items, tmp_path / "out", {"a": 1})
    assert single.todo == items and single.shard == items


def test_plan_batch_leaves_out_what_a_resumed_run_skips_and_run_batch_follows_it(tmp_path):
    items = _photos(tmp_path / "in", 5)
    out = tmp_path / "out"
    run_batch(items[:2] + items[3:4], _copy, out_dir=out, config={"a": 1}, progress=False)  # p0, p1, p3 done

    plan = plan_batch(items, out, {"a": 1}, resume=True)
    assert [it.path.name for it in plan.todo] == ["p2.png", "p4.png"] and plan.resumed == 3
    assert plan_batch(items, out, {"a": 2}, resume=True).todo == items  # other settings: nothing is done
    assert plan_batch(items, out, {"a": 1}, resume=False).todo == items
    sharded = plan_batch(items, out, {"a": 1}, resume=True, rank=0, world_size=2)  # p0 p2 p4, p0 done
    assert [it.path.name for it in sharded.todo] == ["p2.png", "p4.png"] and sharded.resumed == 1

    asked = []
    summary = run_batch(items, lambda it, dst: (asked.append(it), _copy(it, dst))[1], out_dir=out,
                        config={"a": 1}, resume=True, progress=False)
    assert asked == plan.todo and summary.resumed == plan.resumed


# ----------------------------------------------------------------------------- no face
@pytest.mark.parametrize("policy, status", [("skip", "skipped"), ("copy", "copied")])
def test_no_face_result_follows_the_policy(tmp_path, policy, status):
    (item,) = _photos(tmp_path / "in", 1)
    dst = tmp_path / "out" / "p0.png"
    img = load_image(item.path)
    res = no_face_result(item, dst, img, policy=FacePolicy(on_no_face=policy), save=SaveOptions(),
                         timings={"load_s": 0.1}, extra={"mode": "dodging"})
    assert res.status == status and res.faces == 0
    assert res.extra == {"mode": "dodging", "reason": "no face"}
    assert no_face_status(FacePolicy(on_no_face=policy), item.path) == status
    if status == "copied":
        assert res.output == dst and "save_s" in res.timings
        assert np.array_equal(load_image(dst).rgb, img.rgb)
    else:
        assert res.output is None and not dst.exists() and "save_s" not in res.timings


def test_no_face_with_the_error_policy_fails_the_photo(tmp_path):
    (item,) = _photos(tmp_path / "in", 1)
    policy = FacePolicy(on_no_face="error")
    with pytest.raises(NoFaceError, match="no face found in"):
        no_face_result(item, tmp_path / "o.png", load_image(item.path), policy=policy, save=SaveOptions(), timings={})
    with pytest.raises(NoFaceError):
        no_face_status(policy, item.path)
    assert not (tmp_path / "o.png").exists()


def test_process_photo_without_a_face_gives_the_same_row_as_its_steps(tmp_path):
    (item,) = _photos(tmp_path / "in", 1)
    res = process_photo(item, tmp_path / "out" / "p0.png", detector=_Counting([]), policy=FacePolicy(),
                        edit=lambda x, faces, img: x, save=SaveOptions())
    assert res.status == "copied" and res.extra == {"reason": "no face"}
    assert set(res.timings) == {"load_s", "detect_s", "save_s"}


# ----------------------------------------------------------------------------- edited photos
def test_save_edited_writes_the_edit_and_records_the_boxes(tmp_path):
    (item,) = _photos(tmp_path / "in", 1)
    img, faces, timings = load_and_detect(item, detector=_Counting([_face()]), policy=FacePolicy())
    assert len(faces) == 1 and set(timings) == {"load_s", "detect_s"}
    y = torch.ones_like(img.to_tensor())
    dst = tmp_path / "out" / "p0.png"
    res = save_edited(img.with_pixels(y), dst, faces, save=SaveOptions(), timings=timings, extra={"mode": "m"})
    assert res.status == "ok" and res.output == dst and res.faces == 1
    assert list(res.extra) == ["mode", "boxes"] and res.extra["boxes"] == [[4.0, 4.0, 28.0, 30.0]]
    assert "save_s" in res.timings and load_image(dst).rgb.min() == 255


def test_unprotected_result_names_the_faces_and_keeps_every_box():
    exc = ProtectionFailed("face 1 unprotected", [{"face": 1, "status": "failed"}])
    res = unprotected_result(exc, [_face(), _face(6.0)], {"edit_s": 1.0})
    assert res.status == "error" and res.error == "face 1 unprotected" and res.output is None
    assert res.faces == 2 and res.extra["unprotected"] == [1] and len(res.extra["boxes"]) == 2


# ----------------------------------------------------------------------------- faces already detected
def test_cached_detector_serves_an_image_it_has_seen_without_detecting_again():
    inner = _Counting([_face()])
    det = CachedDetector(inner)
    a, b = np.zeros((8, 8, 3), np.uint8), np.ones((8, 8, 3), np.uint8)
    first = det.detect(a)
    first.clear()  # what a caller does with the list never changes what is served
    assert len(det.detect(a)) == 1 and len(det.detect(b)) == 1 and len(det.detect(a.copy())) == 1
    assert inner.calls == 2
    assert det.detect_batch([a, b]) == [inner.faces, inner.faces] and inner.batches == 1  # frames: never cached
    assert inner.calls == 2


def test_a_first_pass_through_the_cached_detector_spares_the_photo_a_second_detection(tmp_path):
    items = _photos(tmp_path / "in", 2)
    inner = _Counting([_face()])
    det = CachedDetector(inner)
    for it in items:  # the first pass (MAP's scan, a k-Same pool of the inputs)
        det.detect(load_image(it.path).rgb)
    summary = run_batch(items, lambda it, dst: process_photo(it, dst, detector=det, policy=FacePolicy(),
                                                             edit=lambda x, faces, img: x, save=SaveOptions()),
                        out_dir=tmp_path / "out", config={}, progress=False)
    assert summary.counts == {"ok": 2} and inner.calls == 2


# ----------------------------------------------------------------------------- one distributed context
@pytest.mark.parametrize("local, processes", [(("LOCAL_RANK", "1"), 1), (("OMPI_COMM_WORLD_LOCAL_RANK", "1"), 1),
                                              (("LOCAL_RANK", "1"), 2)])
def test_a_launched_process_gets_its_own_gpu_when_accelerate_does_not_say(monkeypatch, local, processes):
    import sys
    import types

    from facepriv.core.distributed import distributed_context

    for v in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE",
              "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_SIZE",
              "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_LOCAL_RANK"):
        monkeypatch.delenv(v, raising=False)

    class PartialState:  # accelerate not set up (one process), or set up on the CPU: no GPU named
        def __init__(self, cpu: bool = False):
            self.num_processes, self.process_index, self.device = processes, processes - 1, torch.device("cpu")

    monkeypatch.setitem(sys.modules, "accelerate", types.SimpleNamespace(PartialState=PartialState))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv(*local)
    assert distributed_context(None, None, torch.device("cuda")) == (1, 2, torch.device("cuda", 1))
    assert distributed_context(None, None, torch.device("cuda", 0)) == (1, 2, torch.device("cuda", 0))  # given
    assert distributed_context(None, None, torch.device("cpu")) == (1, 2, torch.device("cpu"))
    assert distributed_context(0, 2, torch.device("cuda")) == (0, 2, torch.device("cuda"))  # explicit: as given
