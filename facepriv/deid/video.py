"""De-identification of videos, frame by frame, with face tracking.

The most reported complaint about frame-by-frame anonymisers is faces that *flash through*:
the detector misses a face for a frame or two (motion blur, a turned head, a hand) and that
frame goes out unprotected. facepriv runs two passes over the file (PyAV):

1. **detect**: faces are detected on every frame (or every ``detect_every``-th frame, in
   batches) and linked into tracks by box overlap (IoU with the box extrapolated at the
   track's velocity, and a centre-distance fallback for fast motion). A track survives ``track_hold`` frames without a detection.
2. **protect**: every frame gets the faces detected in it *plus*, for each track, a face
   interpolated between its detections before and after (a missed detection inside a track)
   or *held* for up to ``track_hold`` frames after the track's last detection and before its
   first. A held face follows the track's motion: its centre is extrapolated at the track's
   velocity (a least-squares fit over its first/last few detections) and kept inside the
   frame, and its box grows with the time since the face was last seen (``grow`` of the face
   size per frame, up to +100 %) plus half the distance travelled since then (a face that
   slows down or speeds up by half stays covered). The de-identification methods are applied
   to those faces and the frame is encoded.

**Orientation.** Phone videos are often stored sideways with a display matrix (rotation and
possibly a mirror) that players apply. facepriv applies it to every decoded frame (the same
transform as ffmpeg's autorotation), so detection and de-identification work on upright
faces, and writes the upright frames with no display matrix: the output plays upright
everywhere and its stored frame size is the displayed one.

The output has the input's frame count, displayed frame size and timestamps (H.264 for
mp4/mov/mkv/avi, VP9 for webm), is written to a temporary file next to the destination and
renamed when complete, and carries the input's audio only with ``keep_audio`` (the audio
packets are copied, not re-encoded; voices are identifying too, so it is opt-in). Container
metadata is not copied.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..core.errors import ConfigError, FaceprivError
from ..core.faces import Face, FacePolicy, box_iou
from ..core.io import finalize_output
from ..core.photo import no_face_status
from ..core.progress import make_progress

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v")


def is_video(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


@dataclass
class VideoOptions:
    detect_every: int = 1  # run the detector on every N-th frame (tracking fills the others)
    track_hold: int = 10  # frames a track is kept (and its box held) without a detection
    iou: float = 0.3  # minimum box overlap to continue a track
    grow: float = 0.05  # held boxes grow by this fraction of the face per frame held (capped at +100 %)
    keep_audio: bool = False
    crf: int = 18  # encoder quality (lower = better; H.264 / VP9 constant-quality)
    codec: str | None = None  # None = by container: libx264 (mp4/mov/mkv/avi/m4v), libvpx-vp9 (webm)
    batch_size: int = 8  # frames detected together

    def __post_init__(self):
        if self.detect_every < 1:
            raise ConfigError("--detect-every must be >= 1")
        if self.track_hold < 0:
            raise ConfigError("--track-hold must be >= 0")
        if not 0 < self.iou <= 1:
            raise ConfigError("tracking IoU must be in (0, 1]")
        if self.grow < 0:
            raise ConfigError("the growth of held boxes must be >= 0")

    @property
    def hold(self) -> int:
        """Effective hold: never shorter than the gap between two detector runs."""
        return max(self.track_hold, self.detect_every - 1)


# ----------------------------------------------------------------------------- tracking
@dataclass
class Track:
    id: int
    frames: list[int] = field(default_factory=list)
    faces: list[Face] = field(default_factory=list)

    @property
    def last(self) -> int:
        return self.frames[-1]

    def predict(self, frame: int) -> np.ndarray:
        """The box expected at ``frame`` (constant velocity from the last two detections)."""
        box = self.faces[-1].box.astype(np.float64)
        if len(self.frames) < 2:
            return box
        v = (box - self.faces[-2].box) / max(1, self.frames[-1] - self.frames[-2])
        return box + v * (frame - self.frames[-1])


class IoUTracker:
    """Greedy IoU association of detections to live tracks (a live track was last detected at
    most ``hold`` frames before the previous frame), against each track's box extrapolated at
    constant velocity. A detection that overlaps no track by
    ``iou`` still continues one whose centre is within half a face size (fast motion)."""

    def __init__(self, *, hold: int = 10, iou: float = 0.3):
        self.hold, self.iou = int(hold), float(iou)
        self.tracks: list[Track] = []

    def update(self, frame: int, faces: list[Face]) -> list[int]:
        """Add the detections of ``frame``; returns the track id of each face."""
        live = [t for t in self.tracks if frame - t.last - 1 <= self.hold]
        ids = [-1] * len(faces)
        if live and faces:
            tb = np.stack([t.predict(frame) for t in live])
            fb = np.stack([f.box for f in faces])
            score = box_iou(fb, tb)
            fc = (fb[:, :2] + fb[:, 2:]) / 2
            tc = (tb[:, :2] + tb[:, 2:]) / 2
            size = np.minimum(fb[:, None, 2] - fb[:, None, 0], fb[:, None, 3] - fb[:, None, 1])
            near = np.linalg.norm(fc[:, None] - tc[None], axis=-1) < 0.5 * size
            score = np.where(score >= self.iou, score, np.where(near, 1e-3, 0.0))
            while score.size and score.max() > 0:
                i, j = np.unravel_index(int(score.argmax()), score.shape)
                ids[i] = live[j].id
                score[i, :] = 0
                score[:, j] = 0
        for i, face in enumerate(faces):
            if ids[i] < 0:
                track = Track(len(self.tracks))
                self.tracks.append(track)
                ids[i] = track.id
            t = self.tracks[ids[i]]
            t.frames.append(frame)
            t.faces.append(face)
        return ids


def _lerp_face(a: Face, b: Face, w: float, track: int) -> Face:
    return Face(box=((1 - w) * a.box + w * b.box).astype(np.float32),
                landmarks=((1 - w) * a.landmarks + w * b.landmarks).astype(np.float32),
                score=min(a.score, b.score), extra={"track": track, "state": "interpolated"})


#: detections used to estimate a track's velocity at each of its ends
VELOCITY_WINDOW = 5
#: held boxes grow by at most this fraction of the face size (``grow`` per frame until then)
MAX_GROW = 1.0
#: margin of a held box, as a fraction of the distance the face travelled since it was seen
SPEED_SLACK = 0.5


def end_velocity(track: Track, end: str = "last", window: int = VELOCITY_WINDOW) -> np.ndarray:
    """Velocity (px/frame, x and y) of the box centre at the track's ``"first"`` or ``"last"``
    detection: a least-squares line through the centres of its ``window`` detections at that end."""
    k = min(window, len(track.frames))
    if k < 2:
        return np.zeros(2)
    sl = slice(-k, None) if end == "last" else slice(0, k)
    f = np.asarray(track.frames[sl], np.float64)
    c = np.stack([(face.box[:2] + face.box[2:]) / 2 for face in track.faces[sl]]).astype(np.float64)
    if np.ptp(f) == 0:
        return np.zeros(2)
    ff = f - f.mean()
    return (ff[:, None] * (c - c.mean(0))).sum(0) / (ff**2).sum()


def _held_face(f: Face, distance: int, velocity: np.ndarray, grow: float, track: int,
               frame_size: tuple[int, int] | None = None) -> Face:
    """``f`` moved by ``velocity`` x ``distance`` frames (signed: negative = before ``f``) and
    enlarged for the uncertainty of where the face went (see the module docstring)."""
    d = abs(distance)
    c0 = (f.box[:2] + f.box[2:]).astype(np.float64) / 2
    half0 = (f.box[2:] - f.box[:2]).astype(np.float64) / 2
    c = c0 + np.asarray(velocity, np.float64) * distance
    if frame_size is not None:  # a face leaving the picture is held at its edge, never outside
        c = np.clip(c, 0.0, np.asarray(frame_size, np.float64))
    g = 1.0 + min(MAX_GROW, grow * d)
    half = half0 * g + SPEED_SLACK * float(np.hypot(*velocity)) * d
    scale = float(np.max(half / np.maximum(half0, 1e-6)))
    lm = c + (f.landmarks.astype(np.float64) - c0) * scale
    return Face(box=np.concatenate([c - half, c + half]).astype(np.float32), landmarks=lm.astype(np.float32),
                score=f.score, extra={"track": track, "state": "held", "since": d})


def faces_per_frame(tracks: list[Track], n_frames: int, *, hold: int, grow: float = 0.05,
                    frame_size: tuple[int, int] | None = None) -> list[list[Face]]:
    """The faces to protect in every frame: detections, interpolations inside tracks and
    holds for ``hold`` frames before a track's first and after its last detection, moving at
    the track's velocity (``frame_size`` (width, height) keeps held faces inside the frame)."""
    out: list[list[Face]] = [[] for _ in range(n_frames)]
    for t in tracks:
        frames = t.frames
        for k, (f, face) in enumerate(zip(frames, t.faces)):
            if 0 <= f < n_frames:
                out[f].append(Face(face.box, face.landmarks, face.score, {**face.extra, "track": t.id, "state": "detected"}))
            if k + 1 < len(frames):
                nxt, nface = frames[k + 1], t.faces[k + 1]
                for g in range(f + 1, min(nxt, n_frames)):
                    out[g].append(_lerp_face(face, nface, (g - f) / (nxt - f), t.id))
        v_first, v_last = end_velocity(t, "first"), end_velocity(t, "last")
        for d in range(1, hold + 1):
            if 0 <= frames[0] - d < n_frames:
                out[frames[0] - d].append(_held_face(t.faces[0], -d, v_first, grow, t.id, frame_size))
            if 0 <= frames[-1] + d < n_frames:
                out[frames[-1] + d].append(_held_face(t.faces[-1], d, v_last, grow, t.id, frame_size))
    return out


# ----------------------------------------------------------------------------- reading
#: a display matrix's 2x2 part, as signs (a, b, c, d) of FFmpeg's ``AV_PKT_DATA_DISPLAYMATRIX``
#: layout, -> (k, mirror): the upright picture is ``np.rot90(np.fliplr(x) if mirror else x, k)``.
#: Checked against ffmpeg's own autorotation for all eight orientations (tests/test_video.py).
_ORIENTATIONS = {
    (1, 0, 0, 1): (0, False), (1, 0, 0, -1): (2, True), (-1, 0, 0, 1): (0, True), (-1, 0, 0, -1): (2, False),
    (0, -1, 1, 0): (1, False), (0, 1, 1, 0): (1, True), (0, -1, -1, 0): (3, True), (0, 1, -1, 0): (3, False),
}


def frame_orientation(frame) -> tuple[int, bool]:
    """(quarter turns counter-clockwise, mirrored) that make a decoded PyAV frame upright, from
    its display matrix (rotations that are not a multiple of 90 degrees are rounded)."""
    matrix = None
    try:
        for sd in frame.side_data:
            if str(getattr(sd, "type", "")).upper().endswith("DISPLAYMATRIX"):
                matrix = np.frombuffer(bytes(sd), dtype=np.int32)[:9]
                break
    except (AttributeError, TypeError, ValueError):
        matrix = None
    if matrix is None or matrix.size < 5:
        rot = int(round(float(getattr(frame, "rotation", 0) or 0) / 90.0)) % 4
        return rot, False
    a, b, c, d = (float(v) for v in (matrix[0], matrix[1], matrix[3], matrix[4]))
    if max(abs(a), abs(d)) >= max(abs(b), abs(c)):
        key = (int(np.sign(a)) or 1, 0, 0, int(np.sign(d)) or 1)
    else:
        key = (0, int(np.sign(b)) or 1, int(np.sign(c)) or 1, 0)
    return _ORIENTATIONS[key]


def upright(rgb: np.ndarray, orientation: tuple[int, bool]) -> np.ndarray:
    """Apply :func:`frame_orientation`'s transform to an (H, W, 3) frame."""
    k, mirror = orientation
    if mirror:
        rgb = rgb[:, ::-1]
    if k % 4:
        rgb = np.rot90(rgb, k)
    return np.ascontiguousarray(rgb)


def _decoded(frame) -> np.ndarray:
    return upright(frame.to_ndarray(format="rgb24"), frame_orientation(frame))


def probe(path: str | os.PathLike) -> dict:
    """Frame count (when the container knows it), rate, displayed (upright) size, stored size,
    orientation and audio of a video file (the first frame is decoded for the orientation)."""
    import av

    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                raise FaceprivError(f"{path} has no video stream")
            vs = c.streams.video[0]
            w, h = vs.codec_context.width, vs.codec_context.height
            orientation = (0, False)
            for frame in c.decode(vs):
                orientation = frame_orientation(frame)
                w, h = frame.width, frame.height
                break
            k, mirror = orientation
            dw, dh = (h, w) if k % 2 else (w, h)
            return {"frames": int(vs.frames or 0), "fps": float(vs.average_rate or vs.guessed_rate or 0),
                    "width": dw, "height": dh, "stored_size": [w, h],
                    "rotation": 90 * k, "mirrored": mirror,
                    "codec": vs.codec_context.name, "audio": [a.codec_context.name for a in c.streams.audio]}
    except av.error.FFmpegError as exc:
        raise FaceprivError(f"cannot read video {path}: {exc}") from None


def iter_frames(path: str | os.PathLike, *, raw: bool = False):
    """Decoded frames of the first video stream as (index, rgb uint8 (H, W, 3)), upright (the
    display matrix applied; ``raw=True``: as stored)."""
    import av

    with av.open(str(path)) as c:
        for i, frame in enumerate(c.decode(video=0)):
            yield i, (frame.to_ndarray(format="rgb24") if raw else _decoded(frame))


def detect_video(path: str | os.PathLike, detector, *, policy: FacePolicy | None = None,
                 options: VideoOptions | None = None, progress: bool = True) -> tuple[list[list[Face]], int]:
    """Pass 1: detections per (upright) frame (empty lists for frames not detected) and the frame count."""
    options = options or VideoOptions()
    policy = policy or FacePolicy()
    total = probe(path)["frames"] or None
    detections: list[list[Face]] = []
    batch: list[tuple[int, np.ndarray]] = []

    def flush():
        if batch:
            found = detector.detect_batch([b for _, b in batch])
            for (i, _), faces in zip(batch, found):
                detections[i] = policy.select(faces)
            batch.clear()

    with make_progress(enabled=progress, transient=True) as bar:
        task = bar.add_task(f"detect {Path(path).name}", total=total)
        for i, rgb in iter_frames(path):
            detections.append([])
            if i % options.detect_every == 0:
                batch.append((i, rgb))
                if len(batch) >= options.batch_size:
                    flush()
            bar.advance(task)
        flush()
    return detections, len(detections)


def track(detections: list[list[Face]], options: VideoOptions | None = None,
          frame_size: tuple[int, int] | None = None) -> tuple[list[Track], list[list[Face]]]:
    """Tracks over the detections and the faces to protect in every frame (``frame_size``:
    (width, height), keeps held faces inside the frame)."""
    options = options or VideoOptions()
    tracker = IoUTracker(hold=options.hold, iou=options.iou)
    for i, faces in enumerate(detections):
        if faces:
            tracker.update(i, faces)
    return tracker.tracks, faces_per_frame(tracker.tracks, len(detections), hold=options.hold, grow=options.grow,
                                           frame_size=frame_size)


# ----------------------------------------------------------------------------- writing
def _codec_for(dst: Path, requested: str | None) -> str:
    import av

    if requested:
        if requested not in av.codecs_available:
            raise ConfigError(f"video codec {requested!r} is not available in this PyAV build")
        return requested
    prefs = ("libvpx-vp9", "libvpx") if dst.suffix.lower() == ".webm" else ("libx264", "h264", "mpeg4")
    for c in prefs:
        if c in av.codecs_available:
            return c
    raise FaceprivError(f"no video encoder for {dst.suffix} in this PyAV build")


def _count_states(per_frame: list[list[Face]]) -> dict[str, int]:
    """How many faces to protect are detected, interpolated and held, over all frames."""
    states = {"detected": 0, "interpolated": 0, "held": 0}
    for faces in per_frame:
        for f in faces:
            states[f.extra.get("state", "detected")] += 1
    return states


def _temp_output(dst: Path) -> Path:
    """An empty temporary file next to ``dst`` (same suffix), for writing before the rename."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.stem}.", suffix=f".tmp{dst.suffix}", dir=dst.parent)
    os.close(fd)
    return Path(tmp_name)


class _FrameEncoder:
    """The output video stream: encodes upright RGB frames with the input stream's timestamps.

    ``out``: the output container; ``vs``: the input video stream; ``size``: (width, height).
    Counts the frames it wrote in ``written``.
    """

    def __init__(self, out, vs, codec: str, options: VideoOptions, size: tuple[int, int]):
        w, h = size
        self.rate = vs.average_rate or vs.guessed_rate or 25
        ov = out.add_stream(codec, rate=self.rate)
        ov.width, ov.height = w, h  # upright frames, written with no display matrix
        ov.pix_fmt = "yuv420p" if (w % 2 == 0 and h % 2 == 0) or codec == "mpeg4" else "yuv444p"
        if codec in ("libx264", "libvpx-vp9", "libvpx"):
            ov.options = {"crf": str(int(options.crf))} | ({"b:v": "0"} if codec.startswith("libvpx") else {})
        self.use_pts = vs.time_base is not None
        if self.use_pts:
            ov.codec_context.time_base = vs.time_base
        self.out, self.vs, self.ov = out, vs, ov
        self.last_pts = None
        self.written = 0

    def write(self, frame, rgb: np.ndarray) -> None:
        """Encode ``rgb`` in place of the decoded ``frame``, at its timestamp when it has a usable one."""
        import av

        vs, ov = self.vs, self.ov
        nf = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        if self.use_pts and frame.pts is not None and (self.last_pts is None or frame.pts > self.last_pts):
            nf.pts, nf.time_base = frame.pts, frame.time_base
        else:  # missing or non-increasing timestamps: one frame period after the last
            step = max(1, round(1 / (float(self.rate) * float(vs.time_base)))) if self.use_pts else 1
            nf.pts = (self.last_pts + step) if self.last_pts is not None else 0
            nf.time_base = vs.time_base if self.use_pts else ov.codec_context.time_base
        self.last_pts = nf.pts
        for p in ov.encode(nf):
            self.out.mux(p)
        self.written += 1

    def flush(self) -> None:
        """Drain the encoder into the container."""
        for p in self.ov.encode():
            self.out.mux(p)


def _protected_rgb(src: Path, frame, index: int, per_frame: list[list[Face]], methods, deidentify,
                   size: tuple[int, int], device) -> np.ndarray:
    """Frame ``index`` decoded upright, with ``per_frame[index]``'s faces de-identified by ``methods``.

    Raises :class:`FaceprivError` when the protect pass has more frames than the detect pass or
    the frame size changes.
    """
    w, h = size
    if index >= len(per_frame):
        raise FaceprivError(
            f"{src}: the protect pass decoded more frames than the detect pass ({len(per_frame)}); "
            "the video was not written (its faces would have to be guessed)")
    rgb = _decoded(frame)
    if rgb.shape[:2] != (h, w):
        raise FaceprivError(f"{src}: the frame size changes within the video "
                            f"({w}x{h}, then {rgb.shape[1]}x{rgb.shape[0]}); not supported")
    faces = per_frame[index]
    if faces:
        x = torch.from_numpy(rgb).to(device).permute(2, 0, 1).float().div_(255)
        y = deidentify(x, faces, methods)
        rgb = (y.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy())
    return rgb


def _encode_protected(src: Path, tmp: Path, dst: Path, per_frame: list[list[Face]], methods, n: int, *,
                      options: VideoOptions, size: tuple[int, int], progress: bool,
                      device) -> tuple[int, str, bool]:
    """Pass 2: decode ``src``, de-identify each frame's faces and encode the frames into ``tmp``.

    The audio packets are copied with ``options.keep_audio``. Returns (frames written, video codec,
    whether audio was kept); raises :class:`FaceprivError` when the frame count differs from
    ``per_frame``'s.
    """
    import av

    from .pipeline import deidentify

    with av.open(str(src)) as inp, av.open(str(tmp), "w") as out:
        vs = inp.streams.video[0]
        vs.thread_type = "AUTO"
        codec = _codec_for(dst, options.codec)
        enc = _FrameEncoder(out, vs, codec, options, size)
        audio_in = inp.streams.audio[0] if (options.keep_audio and inp.streams.audio) else None
        audio_out = out.add_stream_from_template(audio_in) if audio_in is not None else None
        streams = [vs] + ([audio_in] if audio_in is not None else [])
        with make_progress(enabled=progress, transient=True) as bar:
            task = bar.add_task(f"protect {src.name}", total=n)
            for packet in inp.demux(*streams):
                if packet.stream.type == "audio":
                    if packet.dts is None:
                        continue
                    packet.stream = audio_out
                    out.mux(packet)
                    continue
                for frame in packet.decode():
                    rgb = _protected_rgb(src, frame, enc.written, per_frame, methods, deidentify, size, device)
                    enc.write(frame, rgb)
                    bar.advance(task)
            enc.flush()
        if enc.written != len(per_frame):
            raise FaceprivError(f"{src}: the protect pass decoded {enc.written} frames, the detect pass "
                                f"{len(per_frame)}; the video was not written")
    return enc.written, codec, audio_in is not None


def _video_summary(info: dict, n: int, written: int, codec: str, audio_kept: bool, tracks: list[Track],
                   per_frame: list[list[Face]], options: VideoOptions, times: tuple[float, float, float]) -> dict:
    """The summary :func:`deid_video` returns; ``times``: (start, detect seconds, start of pass 2)."""
    t0, t_detect, t1 = times
    summary = {
        "status": "ok", "frames": written, "frames_in": info["frames"] or n,
        "fps": round(info["fps"], 3), "size": [info["width"], info["height"]], "codec": codec,
        "orientation": {"rotation": info["rotation"], "mirrored": info["mirrored"],
                        "stored_size": info["stored_size"]},
        "audio_kept": audio_kept,
        "tracks": len(tracks), "faces": max((len(f) for f in per_frame), default=0),
        "face_instances": _count_states(per_frame), "frames_with_faces": sum(1 for f in per_frame if f),
        "detect_every": options.detect_every, "track_hold": options.hold,
        "timings": {"detect_s": round(t_detect, 3), "protect_s": round(time.perf_counter() - t1, 3)},
        "fps_processed": round(written / max(1e-9, time.perf_counter() - t0), 2),
    }
    if not tracks:  # on_no_face="copy": the frames went through unchanged, but re-encoded (lossy)
        summary["reason"] = "no face found: frames re-encoded unchanged"
    return summary


def deid_video(src: str | os.PathLike, dst: str | os.PathLike, methods, detector, *,
               policy: FacePolicy | None = None, options: VideoOptions | None = None,
               progress: bool = True, device: str | torch.device = "cpu") -> dict:
    """De-identify every face of the video ``src`` into ``dst`` (see the module docstring).

    ``methods``: :class:`~facepriv.deid.base.DeidMethod` objects applied in sequence. Returns
    a summary (frames, faces, tracks, interpolated and held faces, orientation, timings).
    Raises :class:`FaceprivError` (and writes nothing) when the second pass decodes a different
    number of frames than the first: the faces of a frame that was not detected are never guessed.
    """
    src, dst = Path(src), Path(dst)
    options = options or VideoOptions()
    policy = policy or FacePolicy()
    if dst.resolve() == src.resolve():
        raise FileExistsError(f"refusing to overwrite the input file {src}")
    info = probe(src)
    w, h = info["width"], info["height"]  # displayed (upright) size
    t0 = time.perf_counter()
    detections, n = detect_video(src, detector, policy=policy, options=options, progress=progress)
    t_detect = time.perf_counter() - t0
    tracks, per_frame = track(detections, options, frame_size=(w, h))
    if not tracks and no_face_status(policy, src) == "skipped":  # "copied": re-encoded unchanged
        return {"status": "skipped", "frames": n, "faces": 0, "reason": "no face"}

    tmp = _temp_output(dst)
    t1 = time.perf_counter()
    try:
        written, codec, audio_kept = _encode_protected(src, tmp, dst, per_frame, methods, n, options=options,
                                                       size=(w, h), progress=progress, device=device)
        finalize_output(tmp, dst, protected=(src,))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return _video_summary(info, n, written, codec, audio_kept, tracks, per_frame, options, (t0, t_detect, t1))


def frame_count(path: str | os.PathLike) -> int:
    """Decoded frame count (exact; decodes the whole stream)."""
    return sum(1 for _ in iter_frames(path))
