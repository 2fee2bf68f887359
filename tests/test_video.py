"""Video de-identification: tracking fills missed detections, frame count and audio are kept."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import fixture_path
from facepriv.core.faces import Face, FaceDetector
from facepriv.deid import VideoOptions, create_method, deid_video
from facepriv.deid.video import IoUTracker, frame_count, iter_frames, probe, track

N_FRAMES, W, H, STEP, X0, Y0 = 12, 360, 240, 12, 10, 8


def box_face(x: float, y: float, s: float = 40.0, frame: int = 0) -> Face:
    pts = np.array([[0.3, 0.4], [0.7, 0.4], [0.5, 0.6], [0.35, 0.8], [0.65, 0.8]]) * s + [x, y]
    return Face(np.array([x, y, x + s, y + s], np.float32), pts.astype(np.float32), 0.99, {"frame": frame})


# ----------------------------------------------------------------------------- tracking (no models)
def test_tracker_links_moving_faces_and_splits_distant_ones():
    tr = IoUTracker(hold=2, iou=0.3)
    ids = [tr.update(i, [box_face(10 + 5 * i, 10), box_face(200, 100 + 3 * i)]) for i in range(5)]
    assert all(i == ids[0] for i in ids) and len(tr.tracks) == 2
    # fast motion (no overlap) but a centre within half a face: still the same track
    assert tr.update(5, [box_face(10 + 5 * 4 + 13, 10 + 13)])[0] == ids[0][0]
    # a gap longer than hold starts a new track
    assert tr.update(9, [box_face(200, 112)])[0] not in ids[0]


def test_faces_per_frame_interpolates_and_holds():
    dets = [[] for _ in range(20)]
    for f in (5, 6, 7, 10, 11):  # missed at 8 and 9
        dets[f] = [box_face(10.0 * f, 50.0, frame=f)]
    tracks, per = track(dets, VideoOptions(track_hold=3))
    assert len(tracks) == 1
    states = [[x.extra["state"] for x in fs] for fs in per]
    assert states[8] == ["interpolated"] and states[9] == ["interpolated"]
    assert np.allclose(per[8][0].box[0], 80.0) and np.allclose(per[9][0].box[0], 90.0)
    assert [len(fs) for fs in per] == [0, 0] + [1] * 13 + [0] * 5  # held 3 frames before 5 and after 11
    assert states[2] == ["held"] and states[14] == ["held"] and not per[15]
    held = per[14][0]
    assert held.width > per[11][0].width  # held boxes grow
    # without hold a missed frame breaks the track and is left unprotected
    _, bare = track(dets, VideoOptions(track_hold=0))
    assert not bare[8] and not bare[9] and bare[10]


def test_detect_every_is_filled_by_interpolation():
    dets = [[box_face(4.0 * f, 20.0)] if f % 4 == 0 else [] for f in range(13)]
    opts = VideoOptions(detect_every=4, track_hold=0)
    assert opts.hold == 3
    _, per = track(dets, opts)
    assert all(len(fs) == 1 for fs in per)
    assert np.allclose([fs[0].box[0] for fs in per], [4.0 * f for f in range(13)])


# ----------------------------------------------------------------------------- real video
def portrait() -> tuple[np.ndarray, np.ndarray]:
    """Half-size obama portrait and its face centre (in the portrait)."""
    im = Image.open(fixture_path("obama.jpg")).convert("RGB")
    im = im.resize((im.width // 2, im.height // 2), Image.LANCZOS)
    return np.asarray(im), np.array([97.0, 50.0])  # the face centre (MTCNN box) in the half-size portrait


def face_centre(i: int) -> tuple[int, int]:
    _, c = portrait()
    return int(c[0] + X0 + STEP * i), int(c[1] + Y0)


def make_video(path, *, audio: bool = True, n: int = N_FRAMES):
    face, _ = portrait()
    # a real photo's colours, far too blurred to hold a detectable face
    bg = np.asarray(Image.open(fixture_path("group.jpg")).convert("RGB").resize((16, 12), Image.BOX).resize((W, H), Image.BICUBIC))
    with av.open(str(path), "w") as out:
        v = out.add_stream("libx264", rate=10)
        v.width, v.height, v.pix_fmt = W, H, "yuv420p"
        v.options = {"crf": "12"}
        a = None
        if audio:
            a = out.add_stream("aac", rate=16000)
            a.layout = "mono"
        for i in range(n):
            frame = bg.copy()
            x = X0 + STEP * i
            frame[Y0:Y0 + face.shape[0], x:x + face.shape[1]] = face[: H - Y0, : W - x]
            vf = av.VideoFrame.from_ndarray(frame, format="rgb24")
            vf.pts = i
            for p in v.encode(vf):
                out.mux(p)
        for p in v.encode():
            out.mux(p)
        if a is not None:
            t = np.arange(16000 * n // 10) / 16000
            samples = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
            for s in range(0, samples.shape[1], 1024):
                af = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[:, s:s + 1024]), format="fltp", layout="mono")
                af.sample_rate, af.pts = 16000, s
                for p in a.encode(af):
                    out.mux(p)
            for p in a.encode():
                out.mux(p)
    return path


class MissingDetector(FaceDetector):
    """The real detector, except that it sees nothing in the frames listed in ``miss``."""

    def __init__(self, inner, miss):
        self.inner, self.miss, self.seen = inner, set(miss), 0

    def detect(self, image):
        return self.detect_batch([image])[0]

    def detect_batch(self, images):
        found = self.inner.detect_batch(images)
        out = []
        for faces in found:
            out.append([] if self.seen in self.miss else faces)
            self.seen += 1
        return out


@pytest.mark.slow
@pytest.mark.realmodels
def test_masked_in_every_frame_despite_a_missed_detection(tmp_path, mtcnn):
    src = make_video(tmp_path / "clip.mp4")
    assert frame_count(src) == N_FRAMES
    mask = create_method("mask")
    res = deid_video(src, tmp_path / "out" / "clip.mp4", [mask], MissingDetector(mtcnn, {4, 5}),
                     options=VideoOptions(track_hold=3, batch_size=4), progress=False)
    assert res["frames"] == N_FRAMES and res["tracks"] == 1
    assert res["face_instances"]["interpolated"] == 2 and res["audio_kept"] is False
    out = tmp_path / "out" / "clip.mp4"
    assert frame_count(out) == N_FRAMES
    info = probe(out)
    assert (info["width"], info["height"]) == (W, H) and info["audio"] == [] and info["fps"] == pytest.approx(10)
    for i, rgb in iter_frames(out):
        cx, cy = face_centre(i)
        assert rgb[cy - 8: cy + 8, cx - 8: cx + 8].mean() < 20, f"frame {i} not masked"
    # the same run without tracking hold leaves the missed frames unprotected
    deid_video(src, tmp_path / "bare.mp4", [mask], MissingDetector(mtcnn, {4, 5}),
               options=VideoOptions(track_hold=0), progress=False)
    frames = dict(iter_frames(tmp_path / "bare.mp4"))
    cx, cy = face_centre(4)
    assert frames[4][cy - 8: cy + 8, cx - 8: cx + 8].mean() > 60


@pytest.mark.slow
@pytest.mark.realmodels
def test_pixelated_video_keeps_audio_and_no_face_is_recognisable(tmp_path, mtcnn):
    from facepriv.core.align import landmarks_tensor
    from facepriv.models import create_model
    from facepriv.models.recognition import embed_faces, similarity

    src = make_video(tmp_path / "clip.mp4")
    dst = tmp_path / "clip-out.mp4"
    res = deid_video(src, dst, [create_method("pixelate")], MissingDetector(mtcnn, {7}),
                     options=VideoOptions(keep_audio=True), progress=False)
    assert res["audio_kept"] is True and frame_count(dst) == N_FRAMES
    with av.open(str(src)) as a, av.open(str(dst)) as b:
        assert b.streams.audio[0].codec_context.name == "aac"
        pa = [bytes(p) for p in a.demux(a.streams.audio[0]) if p.size]
        pb = [bytes(p) for p in b.demux(b.streams.audio[0]) if p.size]
        assert pa == pb  # the audio packets are copied bit for bit
    fr = create_model("dlib-resnet")
    _, first = next(iter_frames(src))
    ref = mtcnn.detect(first)
    assert len(ref) == 1
    ref_emb = embed_faces(fr, torch.from_numpy(first).permute(2, 0, 1).float() / 255, landmarks_tensor(ref))
    checked = 0
    for i, rgb in iter_frames(dst):
        x1 = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
        # where the face really is (moved by STEP px a frame), and any face a detector still finds
        moved = Face(ref[0].box + [STEP * i, 0, STEP * i, 0], ref[0].landmarks + [STEP * i, 0], 1.0)
        for faces in ([moved], mtcnn.detect(rgb)):
            if faces:
                e = embed_faces(fr, x1, landmarks_tensor(faces))
                assert float(similarity(e, ref_emb, "euclidean").max()) < -0.6, f"frame {i}"
                checked += 1
    assert checked >= N_FRAMES


@pytest.mark.realmodels
def test_cli_routes_videos_and_photos(tmp_path, mtcnn):
    import shutil

    from typer.testing import CliRunner

    from facepriv.cli import app
    from facepriv.cli.common import hoist_global_options

    src = tmp_path / "media"
    (src / "clips").mkdir(parents=True)
    make_video(src / "clips" / "walk.mp4", audio=True, n=6)
    shutil.copy(fixture_path("biden.jpg"), src / "biden.jpg")
    (src / "notes.txt").write_text("not media")
    out = tmp_path / "out"
    args = ["--json", "deid", str(src), "--method", "blur", "--out", str(out), "--keep-audio", "--format", "png"]
    r = CliRunner().invoke(app, hoist_global_options(args))
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["counts"] == {"ok": 2}
    assert (out / "clips" / "walk.mp4").is_file() and (out / "biden.png").is_file()
    assert frame_count(out / "clips" / "walk.mp4") == 6 and probe(out / "clips" / "walk.mp4")["audio"] == ["aac"]
    rows = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    video = next(r_ for r_ in rows if r_["input"].endswith("walk.mp4"))
    assert video["video"]["frames"] == 6 and video["video"]["tracks"] == 1 and video["faces"] == 1
    assert not list(out.rglob("*.tmp*"))  # no temporary file left behind
    # resume skips the finished video
    r2 = CliRunner().invoke(app, hoist_global_options(args + ["--resume"]))
    assert json.loads(r2.stdout)["resumed"] == 2


class ScriptedDetector(FaceDetector):
    """Returns the face where the synthetic video put it (no model), except in ``miss``."""

    def __init__(self, miss=()):
        self.miss, self.seen, self.calls = set(miss), 0, 0

    def detect(self, image):
        return self.detect_batch([image])[0]

    def detect_batch(self, images):
        self.calls += len(images)
        out = []
        for _ in images:
            i = self.seen * self.every
            cx, cy = face_centre(i)
            out.append([] if i in self.miss else [box_face(cx - 30, cy - 30, 60.0)])
            self.seen += 1
        return out

    every = 1


@pytest.mark.parametrize("suffix", [".webm", ".mkv"])
def test_containers_detect_every_and_atomic_output(tmp_path, suffix):
    src = make_video(tmp_path / "clip.mp4", audio=True, n=9)
    det = ScriptedDetector(miss={4})  # the detector runs on 0, 2, 4, 6, 8 and misses 4
    det.every = 2
    dst = tmp_path / f"out{suffix}"
    res = deid_video(src, dst, [create_method("mask", color=(0.0, 1.0, 0.0))], det,
                     options=VideoOptions(detect_every=2, track_hold=3, keep_audio=suffix == ".mkv"), progress=False)
    assert det.calls == 5  # frames 0, 2, 4, 6, 8
    assert res["codec"] == ("libvpx-vp9" if suffix == ".webm" else "libx264")
    assert frame_count(dst) == 9 and res["face_instances"] == {"detected": 4, "interpolated": 5, "held": 0}
    assert probe(dst)["audio"] == (["aac"] if suffix == ".mkv" else [])
    for i, rgb in iter_frames(dst):
        cx, cy = face_centre(i)
        patch = rgb[cy - 6: cy + 6, cx - 6: cx + 6].astype(int)
        assert patch[..., 1].mean() > 200 and patch[..., 0].mean() < 60, f"frame {i}"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["clip.mp4", dst.name])
    with pytest.raises(FileExistsError):
        deid_video(src, src, [create_method("mask")], det, progress=False)
