"""The audit's embedding pipeline: faces batched across images stay in place, embeddings equal
the plain path (decode the whole photo, align every face, embed in batches) with one forward
per batch, pre-aligned crops, and readers that keep preparing images while a forward runs.
"""

from __future__ import annotations

import shutil
import threading
import time

import numpy as np
import pytest
import torch
from conftest import fixture_path
from PIL import Image
from torch import nn

from facepriv.audit.embed import FaceEmbeddingCache, embed_aligned, model_input_size, model_template, source_region
from facepriv.core.align import align_faces
from facepriv.core.io import load_image

from .helpers import TinyRecognizer


def test_batching_across_images_keeps_every_face_in_place(mtcnn):
    paths = [fixture_path(n) for n in ("group.jpg", "obama.jpg", "biden.jpg", "obama2.jpg")]
    models = {"tiny": TinyRecognizer(), "tiny-dlib": TinyRecognizer("dlib-150", (150, 150), dim=7)}
    one = FaceEmbeddingCache(models, detector=mtcnn, batch_size=1, workers=1).process(paths, progress=False)
    many = FaceEmbeddingCache(models, detector=mtcnn, batch_size=4, workers=2).process(paths, progress=False)
    big = FaceEmbeddingCache(models, detector=mtcnn, batch_size=64).process(paths, progress=False)
    assert len(one[paths[0].resolve()].faces) == 6
    for p in paths:
        for m in models:
            a, b, c = (r[p.resolve()].embeddings[m] for r in (one, many, big))
            assert a.shape == (len(one[p.resolve()].faces), 12 if m == "tiny" else 7)
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)
    # faces are sorted largest first (the primary face)
    areas = [f.width * f.height for f in one[paths[0].resolve()].faces]
    assert areas == sorted(areas, reverse=True)


def test_pipeline_matches_embed_faces_and_aligned_crops(tmp_path, mtcnn):
    from facepriv.core.align import align_faces, landmarks_tensor
    from facepriv.core.io import load_image
    from facepriv.models.recognition import embed_faces

    model = TinyRecognizer()
    p = fixture_path("obama.jpg")
    cache = FaceEmbeddingCache({"tiny": model}, detector=mtcnn)
    res = cache.process([p], progress=False)[p.resolve()]
    x = load_image(p).to_tensor()
    ref = embed_faces(model, x, landmarks_tensor(res.faces))
    torch.testing.assert_close(res.embeddings["tiny"], ref, atol=1e-5, rtol=1e-5)
    # extra landmark sets are embedded too
    res2 = cache.process([p], extra={p: np.stack([f.landmarks for f in res.faces])}, progress=False)[p.resolve()]
    torch.testing.assert_close(res2.extra["tiny"], ref, atol=1e-5, rtol=1e-5)
    # a pre-aligned crop (arcface-112 at 224 px) re-aligned per model gives the same embedding
    crop = align_faces(x, landmarks_tensor(res.faces[:1]), "arcface-112", size=(224, 224)).crops[0]
    cp = tmp_path / "crop.png"
    Image.fromarray((crop.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(cp)
    al = FaceEmbeddingCache({"tiny": model}, aligned=True).process([cp], progress=False)[cp.resolve()]
    assert len(al.faces) == 1
    cos = torch.nn.functional.cosine_similarity(al.embeddings["tiny"], ref[:1])
    assert float(cos) > 0.999


NAMES = ("group.jpg", "obama.jpg", "biden.jpg", "obama2.jpg")


class _Counting(nn.Module):
    """Wraps a recognizer; records the batch size of every forward call."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.spec, self.calls = inner, getattr(inner, "spec", None), []
        for attr in ("template", "input_size", "metric"):
            if hasattr(inner, attr):
                setattr(self, attr, getattr(inner, attr))

    def forward(self, x):
        self.calls.append(len(x))
        return self.inner(x)


def _reference(model, paths, results, batch_size, *, whole_photo=False):
    """The plain path: each photo's faces (in the pipeline's face order) aligned from the pixels
    of the box the warps read (the pre-change pipeline's rule; ``whole_photo``: from the whole
    photo), concatenated across images and embedded in batches of ``batch_size``."""
    group = (model_template(model), model_input_size(model))
    crops = []
    for p in paths:
        faces = results[p.resolve()].faces
        if not faces:
            continue
        img = load_image(p)
        lm = np.stack([f.landmarks for f in faces]).astype(np.float32)
        x0, y0, x1, y1 = (0, 0, *img.size) if whole_photo else source_region(lm, [group], img.size)
        x = torch.from_numpy(np.ascontiguousarray(img.rgb[y0:y1, x0:x1])).permute(2, 0, 1).float().div_(255.0)
        crops.append(align_faces(x, torch.from_numpy(lm - np.array([x0, y0], dtype=np.float32)), group[0],
                                 size=group[1]).crops)
    return embed_aligned(model, torch.cat(crops), batch_size=batch_size)


@pytest.mark.realmodels
@pytest.mark.parametrize("batch_size,workers", [(4, 2), (32, 1)])
def test_pipeline_embeddings_identical_to_the_plain_path(mtcnn, batch_size, workers):
    from facepriv.models import create_model

    model = _Counting(create_model("dlib-resnet"))
    paths = [fixture_path(n) for n in NAMES]
    cache = FaceEmbeddingCache({"dlib": model}, detector=mtcnn, batch_size=batch_size, workers=workers)
    res = cache.process(paths, progress=False)
    n_faces = sum(len(res[p.resolve()].faces) for p in paths)
    assert n_faces >= 9  # 6 in group.jpg + one per portrait
    # one forward per batch of faces across images, and no probe forward for the embedding size
    assert model.calls == [min(batch_size, n_faces - i) for i in range(0, n_faces, batch_size)]
    got = torch.cat([res[p.resolve()].embeddings["dlib"] for p in paths])
    model.calls.clear()
    ref = _reference(model, paths, res, batch_size)
    assert got.shape == ref.shape == (n_faces, 128)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    # and, up to the float rounding of warping from a crop rather than the whole photo, the same
    # as aligning from the whole decoded photo
    torch.testing.assert_close(got, _reference(model, paths, res, batch_size, whole_photo=True), atol=1e-5, rtol=1e-5)


class _Waiting(nn.Module):
    """A tiny recognizer whose first forward waits (up to a timeout) until ``ready()`` is true,
    recording whether it became true: it sees whether readers keep working during a forward."""

    template, input_size = "arcface-112", (112, 112)

    def __init__(self, ready):
        super().__init__()
        self.ready, self.saw = ready, None
        self.proj = nn.Linear(3, 4)

    def forward(self, x):
        if self.saw is None:
            deadline = time.monotonic() + 20.0
            while not self.ready() and time.monotonic() < deadline:
                time.sleep(0.01)
            self.saw = self.ready()
        return self.proj(x.mean(dim=(2, 3)))


def test_readers_prepare_the_next_batch_while_a_forward_runs(tmp_path, mtcnn, monkeypatch):
    # 8 photos; group.jpg (6 faces) fills the first batch of 4 on its own
    paths = []
    for i in range(2):
        for n in NAMES:
            dst = tmp_path / f"{i}_{n}"
            shutil.copy(fixture_path(n), dst)
            paths.append(dst)
    done, lock = [], threading.Lock()
    original = FaceEmbeddingCache._prepare

    def counted(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        with lock:
            done.append(out.path)
        return out

    monkeypatch.setattr(FaceEmbeddingCache, "_prepare", counted)
    model = _Waiting(lambda: len(done) == len(paths))
    cache = FaceEmbeddingCache({"w": model}, detector=mtcnn, batch_size=4, workers=2)
    res = cache.process(paths, progress=False)
    # during the first forward (after the first photo) the readers prepared all the others
    assert model.saw is True
    assert all(res[p.resolve()].embeddings["w"].shape[0] == len(res[p.resolve()].faces) for p in paths)
