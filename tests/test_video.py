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


def make_video(path, *, audio: bool = True, n: int = N_FRAMES, rotation: int = 0):
    """A clip of the portrait moving STEP px a frame to the right over a blurred background.

    ``rotation`` (a multiple of 90): the frames are stored turned by -rotation degrees with a
    display matrix that turns them back, like a phone video (the displayed clip is the same)."""
    face, _ = portrait()
    # a real photo's colours, far too blurred to hold a detectable face
    bg = np.asarray(Image.open(fixture_path("group.jpg")).convert("RGB").resize((16, 12), Image.BOX).resize((W, H), Image.BICUBIC))
    with av.open(str(path), "w") as out:
        v = out.add_stream("libx264", rate=10)
        k = (rotation // 90) % 4
        v.width, v.height = (H, W) if k % 2 else (W, H)  # the stored (sideways) size
        v.pix_fmt = "yuv420p"
        v.options = {"crf": "12"}
        if k:
            if not hasattr(v, "set_display_rotation"):
                pytest.skip("this PyAV cannot write a display matrix (PyAV >= 18 can)")
            v.set_display_rotation(90 * k)
        a = None
        if audio:
            a = out.add_stream("aac", rate=16000)
            a.layout = "mono"
        for i in range(n):
            frame = bg.copy()
            x = X0 + STEP * i
            frame[Y0:Y0 + face.shape[0], x:x + face.shape[1]] = face[: H - Y0, : W - x]
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(np.rot90(frame, -k)), format="rgb24")
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
    """Returns the face where the synthetic video put it (no model), except in ``miss`` and in
    frames that are not upright (W x H), where - like a real detector on a face lying on its
    side - it finds nothing."""

    def __init__(self, miss=()):
        self.miss, self.seen, self.calls = set(miss), 0, 0

    def detect(self, image):
        return self.detect_batch([image])[0]

    def detect_batch(self, images):
        self.calls += len(images)
        out = []
        for image in images:
            i = self.seen * self.every
            cx, cy = face_centre(i)
            upright = image.shape[:2] == (H, W)
            out.append([] if i in self.miss or not upright else [box_face(cx - 30, cy - 30, 60.0)])
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


# ----------------------------------------------------------------------------- no flash-through at track ends
def covered(faces: list[Face], box: np.ndarray, hw: tuple[int, int], region: str) -> float:
    """Fraction of the in-frame pixels of ``box`` that the faces' ``region`` masks cover."""
    from facepriv.core.regions import region_mask

    cover = torch.zeros(hw)
    for f in faces:
        r = region_mask(f, hw, region=region, feather=0.0)
        if r is not None:
            cover[r.y0:r.y1, r.x0:r.x1] = torch.maximum(cover[r.y0:r.y1, r.x0:r.x1], r.mask[0])
    x1, y1 = max(0, int(np.ceil(box[0]))), max(0, int(np.ceil(box[1])))
    x2, y2 = min(hw[1], int(box[2])), min(hw[0], int(box[3]))
    return float((cover[y1:y2, x1:x2] >= 1).float().mean())


def test_held_faces_follow_a_moving_face_at_both_track_ends():
    """A face moving steadily (10 px/frame right, 2 down) that the detector misses for its first
    and last 5 frames, leaving the picture at the end: every frame's true box is covered."""
    n, miss, size, hw = 30, 5, 50.0, (240, 320)
    truth = [np.array([15 + 10 * f, 60 + 2 * f, 15 + 10 * f + size, 60 + 2 * f + size]) for f in range(n)]
    assert truth[-1][2] > hw[1]  # the face leaves the frame at the end
    dets = [[box_face(b[0], b[1], size, frame=f)] if miss <= f < n - miss else [] for f, b in enumerate(truth)]
    tracks, per = track(dets, VideoOptions(track_hold=miss), frame_size=(hw[1], hw[0]))
    assert len(tracks) == 1
    for f in range(n):
        state = per[f][0].extra["state"]
        assert state == ("held" if f < miss or f >= n - miss else "detected")
        assert covered(per[f], truth[f], hw, "box") == 1.0, f"frame {f}: the true face box is not covered"
        # the face ellipse too (the default region): the true face's own ellipse lies inside the held one
        true_face = box_face(truth[f][0], truth[f][1], size)
        if f < n - miss:  # (at the end the true face is partly outside the frame; the box check covers it)
            from facepriv.core.regions import region_mask

            r = region_mask(true_face, hw, region="face", feather=0.0)
            ys, xs = torch.nonzero(r.mask[0] >= 1, as_tuple=True)
            held = torch.zeros(hw)
            for face in per[f]:
                q = region_mask(face, hw, region="face", feather=0.0)
                held[q.y0:q.y1, q.x0:q.x1] = torch.maximum(held[q.y0:q.y1, q.x0:q.x1], q.mask[0])
            assert bool((held[ys + r.y0, xs + r.x0] >= 1).all()), f"frame {f}: face ellipse not covered"
    # held boxes stay inside the frame (their centre is clamped) and grow with the time unseen
    last = [per[f][0] for f in range(n - miss, n)]
    assert all(0 <= (fc.box[0] + fc.box[2]) / 2 <= hw[1] for fc in last)
    assert all(b.width > a.width for a, b in zip(last, last[1:]))
    # a hold that ignores the motion (the old behaviour) would leave the face uncovered
    from facepriv.deid.video import _held_face

    static = _held_face(dets[miss][0], -3, np.zeros(2), 0.03, 0)
    assert covered([static], truth[miss - 3], hw, "box") < 0.7


def test_velocity_is_fitted_at_each_end_of_a_track():
    from facepriv.deid.video import Track, end_velocity

    t = Track(0, frames=[0, 1, 2, 3, 6, 7, 8], faces=[box_face(5.0 * f, 0.0) for f in range(4)]
              + [box_face(50.0 - 2 * f, 3.0 * f) for f in (6, 7, 8)])
    assert np.allclose(end_velocity(t, "first", window=4), [5.0, 0.0])
    assert np.allclose(end_velocity(t, "last", window=3), [-2.0, 3.0])
    assert np.allclose(end_velocity(Track(1, [4], [box_face(0.0, 0.0)])), 0.0)


def test_no_flash_through_when_a_moving_face_is_missed_at_the_start_and_end(tmp_path):
    """End to end: the detector misses the moving face in the first 3 and last 3 frames; the
    output still shows the mask over the whole true face box in every frame."""
    src = make_video(tmp_path / "clip.mp4", audio=False)
    miss = {0, 1, 2, N_FRAMES - 3, N_FRAMES - 2, N_FRAMES - 1}
    dst = tmp_path / "out.mp4"
    res = deid_video(src, dst, [create_method("mask", color=(0.0, 1.0, 0.0), region="box")],
                     ScriptedDetector(miss=miss), options=VideoOptions(track_hold=4), progress=False)
    assert res["face_instances"] == {"detected": N_FRAMES - 6, "interpolated": 0, "held": 6}
    for i, rgb in iter_frames(dst):
        cx, cy = face_centre(i)
        patch = rgb[max(0, cy - 27): cy + 27, cx - 27: cx + 27].astype(int)  # the true 60 px box, less codec bleed
        assert patch[..., 1].min() > 180 and patch[..., 0].max() < 80, f"frame {i}: the face shows through"


# ----------------------------------------------------------------------------- rotation (phone videos)
def test_orientation_matches_ffmpeg_autorotation_for_all_eight(tmp_path):
    """Our reading of the display matrix turns frames exactly like ffmpeg's own autorotation."""
    import subprocess

    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    ff = imageio_ffmpeg.get_ffmpeg_exe()
    img = np.zeros((48, 64, 3), np.uint8)
    img[:16, :24] = [255, 0, 0]
    img[-16:, :8] = [0, 255, 0]
    base = tmp_path / "base.mkv"
    with av.open(str(base), "w") as out:
        v = out.add_stream("libx264", rate=10)
        v.width, v.height, v.pix_fmt, v.options = 64, 48, "yuv444p", {"qp": "0"}
        vf = av.VideoFrame.from_ndarray(img, format="rgb24")
        vf.pts = 0
        for p in list(v.encode(vf)) + list(v.encode()):
            out.mux(p)
    seen = set()
    for rot in (0, 90, 180, 270):
        for flips in ([], ["-display_hflip"]):
            clip = tmp_path / f"r{rot}{len(flips)}.mp4"
            made = subprocess.run([ff, "-y", "-loglevel", "error", "-display_rotation", str(rot), *flips, "-i",
                                   str(base), "-c", "copy", str(clip)], capture_output=True, text=True)
            if made.returncode and "display_rotation" in made.stderr:
                pytest.skip("this ffmpeg has no -display_rotation (ffmpeg >= 7 has)")
            assert made.returncode == 0, made.stderr
            shown = subprocess.run([ff, "-loglevel", "error", "-i", str(clip), "-frames:v", "1", "-f", "rawvideo",
                                    "-pix_fmt", "rgb24", "-"], check=True, capture_output=True).stdout
            _, ours = next(iter_frames(clip))
            assert len(shown) == ours.size, (rot, flips)
            assert np.abs(np.frombuffer(shown, np.uint8).reshape(ours.shape).astype(int) - ours).mean() < 3, (rot, flips)
            info = probe(clip)
            assert (info["width"], info["height"]) == ours.shape[1::-1]
            seen.add(ours.tobytes())
    assert len(seen) == 8  # eight different pictures: every orientation was really exercised


@pytest.mark.parametrize("rotation", [90, 270])
def test_rotated_phone_video_is_processed_and_written_upright(tmp_path, rotation):
    src = make_video(tmp_path / "phone.mp4", audio=False, n=6, rotation=rotation)
    with av.open(str(src)) as c:  # stored sideways, with a display matrix
        assert (c.streams.video[0].codec_context.width, c.streams.video[0].codec_context.height) == (H, W)
    assert probe(src)["rotation"] in (90, 270) and (probe(src)["width"], probe(src)["height"]) == (W, H)
    det = ScriptedDetector()  # finds the face only in upright frames
    dst = tmp_path / "out.mp4"
    res = deid_video(src, dst, [create_method("mask", color=(0.0, 1.0, 0.0), region="box")], det, progress=False)
    assert res["tracks"] == 1 and res["face_instances"]["detected"] == 6
    assert res["size"] == [W, H] and res["orientation"]["rotation"] == probe(src)["rotation"]
    out = probe(dst)
    assert (out["width"], out["height"]) == (W, H) and out["rotation"] == 0 and not out["mirrored"]
    assert out["stored_size"] == [W, H]  # stored upright, no display matrix: plays upright everywhere
    raw = dict(iter_frames(dst, raw=True))
    upright_in = dict(iter_frames(src))
    assert len(raw) == 6
    for i, rgb in raw.items():
        cx, cy = face_centre(i)
        patch = rgb[cy - 25: cy + 25, cx - 25: cx + 25].astype(int)
        assert patch[..., 1].min() > 180 and patch[..., 0].max() < 80, f"frame {i}"
        # away from the face the output is the upright input (up to re-encoding)
        assert np.abs(rgb[-40:].astype(int) - upright_in[i][-40:]).mean() < 4


@pytest.mark.realmodels
def test_real_detector_finds_the_face_of_a_rotated_video(tmp_path, mtcnn):
    src = make_video(tmp_path / "phone.mp4", audio=False, n=6, rotation=90)
    res = deid_video(src, tmp_path / "out.mp4", [create_method("mask")], mtcnn, progress=False)
    assert res["tracks"] == 1 and res["face_instances"]["detected"] == 6
    for i, rgb in iter_frames(tmp_path / "out.mp4"):
        cx, cy = face_centre(i)
        assert rgb[cy - 8: cy + 8, cx - 8: cx + 8].mean() < 20, f"frame {i} not masked"


# ----------------------------------------------------------------------------- pass mismatch, no face
def test_a_frame_count_mismatch_between_passes_fails_without_output(tmp_path, monkeypatch):
    import facepriv.deid.video as video
    from facepriv.core.errors import FaceprivError

    src = make_video(tmp_path / "clip.mp4", audio=False, n=6)
    real = video.detect_video

    def short(*a, **kw):  # the detect pass "decodes" one frame fewer than the protect pass
        dets, n = real(*a, **kw)
        return dets[:-1], n - 1

    monkeypatch.setattr(video, "detect_video", short)
    with pytest.raises(FaceprivError, match="more frames"):
        deid_video(src, tmp_path / "out.mp4", [create_method("mask")], ScriptedDetector(), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]  # nothing written, no temporary left


def test_a_video_without_faces_is_reported_as_re_encoded(tmp_path):
    class Blind(FaceDetector):
        def detect(self, image):
            return []

    src = make_video(tmp_path / "clip.mp4", audio=False, n=4)
    res = deid_video(src, tmp_path / "out.mp4", [create_method("mask")], Blind(), progress=False)
    assert res["status"] == "ok" and res["tracks"] == 0 and "re-encoded" in res["reason"]
    assert frame_count(tmp_path / "out.mp4") == 4
