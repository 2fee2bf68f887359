"""k-Same: every output face is exactly the mean of k aligned pool faces of k distinct people."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import fixture_path
from facepriv.core.align import align_faces, landmarks_tensor
from facepriv.core.errors import ConfigError, FaceprivError
from facepriv.core.faces import FaceDetector
from facepriv.deid import FacePool, create_method
from facepriv.deid.ksame import face_ellipse, ksame_template
from test_deid_classical import make_face


def smooth_image(seed: int, h: int = 256, w: int = 256) -> torch.Tensor:
    """A distinct, smooth random picture per 'person' (low-res noise upsampled)."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(1, 3, 12, 12, generator=g)
    return torch.nn.functional.interpolate(small, size=(h, w), mode="bicubic", align_corners=False)[0].clamp(0, 1)


FACE = make_face(128, 128, 140)


def pool_of(n: int, per_identity: int = 1) -> FacePool:
    pool = FacePool.empty()
    for i in range(n):
        for j in range(per_identity):
            ident = f"person{i}" if per_identity > 1 else None
            pool.add(smooth_image(100 * i + j), [FACE], f"img{i}_{j}", ident)
    return pool


def method(name="k-same-average", k=3, **kw):
    return create_method(name, k=k, model=None, match_color=False, **kw)


def test_template_and_ellipse_fit_the_crop():
    tpl = ksame_template(128)
    pts = np.asarray(tpl.points)
    assert tpl.size == (128, 128) and pts[0, 0] < pts[1, 0] and pts[2, 1] < pts[3, 1]
    m = face_ellipse(tpl, feather=0.15)[0, 0]
    assert float(m[64, 64]) == 1.0 and float(m[:, 0].max()) == 0 and float(m[0].max()) == 0 and float(m[-1].max()) == 0


def test_output_is_exactly_the_average_of_k_pool_faces():
    pool = pool_of(8)
    m = method(k=4)
    m.set_pool(pool)
    x = smooth_image(999)
    crops = align_faces(x, landmarks_tensor([FACE]), m.template).crops
    chosen = m.select(crops, None)
    assert len(chosen) == 1 and len(chosen[0]) == 4 and len(set(chosen[0])) == 4
    synth = m.synthesize(crops, chosen)
    expected = torch.stack([pool.crops[j] for j in chosen[0]]).mean(0)
    assert torch.allclose(synth[0], expected.clamp(0, 1), atol=1e-6)
    # they are the 4 nearest in masked grey pixels
    from facepriv.deid.ksame import grey_features

    mask = face_ellipse(m.template, feather=0.0)
    d = torch.cdist(grey_features(crops, mask), grey_features(pool.crops, mask))[0]
    assert sorted(chosen[0]) == sorted(torch.argsort(d)[:4].tolist())


def test_pasted_face_is_the_average_inside_the_mask_and_the_rest_is_untouched():
    pool = pool_of(6)
    m = method(k=3)
    m.set_pool(pool)
    x = smooth_image(999)
    y = m.apply(x, [FACE])
    info = m.last_info["faces"][0]
    assert len(info["pool"]) == 3 and len(set(info["identities"])) == 3
    idx = [pool.sources.index(s) for s in info["pool"]]
    avg = pool.crops[idx].mean(0)
    back = align_faces(y, landmarks_tensor([FACE]), m.template).crops[0]
    core = face_ellipse(m.template, feather=0.0)[0, 0] > 0
    core[:, :] &= face_ellipse(m.template, feather=0.0)[0, 0].roll(6, 0) > 0  # away from the edge
    assert float((back - avg)[:, core].abs().mean()) < 0.01
    # far from the face nothing changed
    assert torch.equal(y[:, :, :20], x[:, :, :20]) and torch.equal(y[:, -20:], x[:, -20:])


def test_the_face_itself_is_never_in_its_average():
    pool = pool_of(5)
    m = method(k=4)
    m.set_pool(pool)
    x = smooth_image(200)  # = pool image "img2_0"
    m.apply(x, [FACE])
    assert "img2_0#0" not in m.last_info["faces"][0]["pool"]
    with pytest.raises(FaceprivError, match="only 4 pool identities"):
        method(k=5, pool=pool).apply(x, [FACE])


def test_k_distinct_identities_with_identity_folders(tmp_path):
    class Fixed(FaceDetector):
        def detect(self, image):
            return [FACE]

    for i, person in enumerate(("ann", "bob", "cy")):
        (tmp_path / "pool" / person).mkdir(parents=True)
        for j in range(3):
            arr = (smooth_image(100 * i + j).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            Image.fromarray(arr).save(tmp_path / "pool" / person / f"{j}.png")
    pool = FacePool.from_folder(tmp_path / "pool", Fixed(), progress=False)
    assert len(pool) == 9 and pool.n_identities == 3 and pool.identity_mode == "folders"
    m = method(k=3)
    m.set_pool(pool)
    m.apply(smooth_image(5000), [FACE])
    assert sorted(m.last_info["faces"][0]["identities"]) == ["ann", "bob", "cy"]
    # a photo of bob (in the pool): all of bob's faces are excluded, 2 people remain
    bob = (torch.from_numpy(np.array(Image.open(tmp_path / "pool" / "bob" / "1.png"))).permute(2, 0, 1) / 255.0)
    m2 = method(k=2)
    m2.set_pool(pool)
    m2.apply(bob, [FACE])
    assert sorted(m2.last_info["faces"][0]["identities"]) == ["ann", "cy"]
    with pytest.raises(FaceprivError):
        m.apply(bob, [FACE])
    # save / load round trip
    pool.save(tmp_path / "pool.safetensors")
    again = FacePool.load(tmp_path / "pool.safetensors")
    assert torch.equal(again.crops, pool.crops) and again.identities == pool.identities
    assert again.template.points == pool.template.points


def test_k_same_pixelate_is_blocks_of_the_average():
    pool = pool_of(6)
    avg_m, pix_m = method("k-same-average"), method("k-same-pixelate")
    avg_m.set_pool(pool)
    pix_m.set_pool(pool)
    x = smooth_image(999)
    crops = align_faces(x, landmarks_tensor([FACE]), avg_m.template).crops
    chosen = avg_m.select(crops, None)
    assert pix_m.select(crops, None) == chosen
    a = avg_m.synthesize(crops, chosen)[0]
    p = pix_m.synthesize(crops, chosen)[0]
    b = pix_m.block()
    assert b == 16
    for by in range(0, 128, b):
        for bx in range(0, 128, b):
            blk = p[:, by:by + b, bx:bx + b]
            assert float((blk - blk[:, :1, :1]).abs().max()) == 0
            assert torch.allclose(blk[:, 0, 0], a[:, by:by + b, bx:bx + b].mean((1, 2)), atol=1e-5)


def test_colour_match_is_a_constant_shift():
    pool = pool_of(6)
    plain, matched = method(), create_method("k-same-average", k=3, model=None)
    plain.set_pool(pool)
    matched.set_pool(pool)
    x = smooth_image(999) * 0.3  # a dark photo
    crops = align_faces(x, landmarks_tensor([FACE]), plain.template).crops
    chosen = plain.select(crops, None)
    d = matched.synthesize(crops, chosen) - plain.synthesize(crops, chosen)
    inner = face_ellipse(plain.template, feather=0.0)[0, 0] > 0
    vals = d[0][:, inner]
    assert float(vals.mean()) < -0.05
    unclipped = vals[:, (plain.synthesize(crops, chosen)[0][:, inner] > 0.5).all(0)]
    assert float((unclipped - unclipped[:, :1]).abs().max()) < 1e-5


def test_config_errors():
    with pytest.raises(ConfigError):
        create_method("k-same-average", k=1)
    with pytest.raises(ConfigError):
        create_method("k-same-select", model=None)
    with pytest.raises(ConfigError):
        method().apply(smooth_image(1), [FACE])  # no pool at all
    with pytest.raises(ConfigError):
        create_method("k-same-average", pool="/no/such/folder")


@pytest.mark.realmodels
def test_k_same_select_on_real_photos_excludes_the_same_person(tmp_path, mtcnn):
    """Pool = the fixtures (group of 6 + obama twice + biden): obama's average never uses obama2."""
    from facepriv.deid import DeidConfig, run_deid

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("obama.jpg", "obama2.jpg", "biden.jpg", "group.jpg"):
        shutil.copy(fixture_path(name), photos / name)
    out = tmp_path / "out"
    cfg = DeidConfig(methods=["k-same-select"], options={"k-same-select": {"k": 3}}, k_pool=str(photos))
    summary = run_deid([photos], out, cfg, progress=False)
    assert summary.counts == {"ok": 4}
    rows = {r["input"].rsplit("/", 1)[-1]: r for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}
    for name in ("obama.jpg", "obama2.jpg"):
        used = rows[name]["deid"]["k-same-select"]["faces"][0]["pool"]
        assert len(used) == 3 and not any("obama" in u for u in used), used
    assert len(rows["group.jpg"]["deid"]["k-same-select"]["faces"]) == 6
    # the result no longer matches the original person
    from facepriv.core.io import load_image
    from facepriv.models import create_model
    from facepriv.models.recognition import embed_faces, similarity

    fr = create_model("dlib-resnet")
    src = load_image(photos / "obama.jpg")
    dst = load_image(out / "obama.jpg")
    lm = landmarks_tensor(mtcnn.detect(src.rgb))
    s = similarity(embed_faces(fr, src.to_tensor(), lm), embed_faces(fr, dst.to_tensor(), lm), "euclidean")
    assert float(s[0]) < -0.6


# ----------------------------------------------------------------------------- --region
def region_pool(n: int, region: str) -> FacePool:
    pool = FacePool.empty(region=region)
    for i in range(n):
        pool.add(smooth_image(100 * i), [FACE], f"img{i}_0")
    return pool


def test_region_head_covers_more_than_face_and_box_covers_the_box_corners():
    x = smooth_image(999)
    changed = {}
    for region in ("face", "head", "box"):
        m = method(k=3, region=region, feather=0.0)
        assert m.honours_region and m.describe()["region"] == region
        m.set_pool(region_pool(6, region))
        y = m.apply(x, [FACE])
        changed[region] = (y - x).abs().amax(0) > 1e-6
        # whatever the region, each output face is still the average of 3 people
        assert len(set(m.last_info["faces"][0]["identities"])) == 3
    face, head, box = changed["face"], changed["head"], changed["box"]
    assert int(head.sum()) > 1.5 * int(face.sum())
    assert float((face & head).sum()) / float(face.sum()) > 0.98  # the head region contains the face's
    # the box is the rectangle around the face ellipse: it contains it and adds the corners
    assert float((face & box).sum()) / float(face.sum()) > 0.98 and int(box.sum()) > 1.15 * int(face.sum())
    # the head reaches higher (hair) than the face; all three stay around the face
    rows = lambda t: torch.nonzero(t.any(1)).flatten()  # noqa: E731
    assert int(rows(head)[0]) < int(rows(face)[0]) - 10
    for got in changed.values():
        assert not bool(got[:, :20].any()) and not bool(got[-20:].any())


def test_a_pool_aligned_for_another_region_is_refused():
    m = method(region="head")
    with pytest.raises(ConfigError, match="template"):
        m.set_pool(pool_of(6))  # aligned for the face region


def test_eyebar_does_not_claim_a_region():
    from facepriv.deid.pipeline import region_warnings

    bar, blur = create_method("eyebar", region="head"), create_method("blur", region="head")
    assert bar.describe()["region"] is None and bar.describe()["region_ignored"] == "head"
    assert blur.describe()["region"] == "head"
    with pytest.raises(ConfigError, match="eyebar"):
        region_warnings([bar], "head")
    (w,) = region_warnings([blur, bar], "head")
    assert "eyebar" in w and "blur" in w
    assert region_warnings([create_method("eyebar")], "face") == []


def test_k_same_average_and_select_have_no_strength_but_pixelate_does():
    from facepriv.deid.pipeline import strength_warnings

    avg, pix = (create_method(n, strength=2.0, model=None) for n in ("k-same-average", "k-same-pixelate"))
    sel = create_method("k-same-select", strength=2.0)  # the model loads at setup, not here
    assert avg.describe()["strength"] is None and sel.describe()["strength"] is None
    assert pix.describe()["strength"] == 2.0 and pix.block() != create_method("k-same-pixelate", model=None).block()
    with pytest.raises(ConfigError, match="--k"):
        strength_warnings([avg, sel], 2.0)
    (w,) = strength_warnings([avg, pix], 2.0)
    assert "k-same-average" in w and "k-same-pixelate" in w
    assert strength_warnings([avg], 1.0) == []


# ----------------------------------------------------------------------------- mixed-layout pools
class _Model:
    """Stands in for a recognition model in clustering: name and metric (the embeddings are given)."""

    class spec:  # noqa: N801
        name = "fake"

    metric = "cosine"


def test_loose_images_in_a_pool_with_identity_folders_are_grouped_by_the_model():
    pool = FacePool.empty()
    people = {  # source -> (folder identity or None, the person really shown)
        "ann_0": ("ann", "ann"), "ann_1": ("ann", "ann"), "bob_0": ("bob", "bob"), "cy_0": ("cy", "cy"),
        "root_dee_0": (None, "dee"), "root_dee_1": (None, "dee"),  # two photos of one new person
        "root_ann": (None, "ann"),  # a loose photo of ann
        "root_eve": (None, "eve"),
    }
    persons = sorted({p for _, p in people.values()})
    emb = []
    for i, (src, (folder, person)) in enumerate(people.items()):
        pool.add(smooth_image(10 * i), [FACE], src, folder)
        e = torch.zeros(len(persons))
        e[persons.index(person)] = 1.0
        emb.append(e + 0.05 * torch.randn(len(persons)))
    pool.embeddings["fake"] = torch.stack(emb)
    pool.identity_mode = "folders"
    m = method(k=3)
    m.model, m.threshold = _Model(), 0.8  # what setup() loads
    m.set_pool(pool)
    ident = dict(zip([s.split("#")[0] for s in pool.sources], pool.identities))
    assert ident["root_dee_0"] == ident["root_dee_1"] != ident["root_eve"]
    assert ident["root_ann"] == "ann" and ident["bob_0"] == "bob"
    assert pool.n_identities == 5 and pool.identity_mode == "folders+clustered"
    # so an average over k = 5 identities can never hold two photos of dee (or of ann)
    m5 = method(k=5)
    m5.set_pool(pool)
    m5.apply(smooth_image(5000), [FACE])
    used = m5.last_info["faces"][0]["pool"]
    people_used = [people[s.split("#")[0]][1] for s in used]
    assert sorted(people_used) == persons
    with pytest.raises(FaceprivError):
        method(k=6, pool=pool).apply(smooth_image(5000), [FACE])


def test_a_loose_face_matching_two_folders_merges_them():
    pool = FacePool.empty()
    for i, (src, ident) in enumerate((("a", "ann"), ("b", "bob"), ("c", "cy"), ("loose", None))):
        pool.add(smooth_image(i), [FACE], src, ident)
    pool.embeddings["fake"] = torch.tensor([[1.0, 0, 0], [0.8, 0.6, 0], [0, 0, 1], [0.95, 0.31, 0]])
    pool.cluster_identities(_Model(), 0.9)  # loose ~ ann (0.95) and ~ bob (0.95); ann !~ bob (0.8)
    assert pool.identities == ["ann+bob", "ann+bob", "cy", "ann+bob"]


@pytest.mark.realmodels
def test_real_mixed_layout_pool_counts_one_person_once(tmp_path, mtcnn):
    """pool/biden/ is a folder identity, obama.jpg and obama2.jpg lie loose in the pool root:
    dlib-resnet makes the two loose photos one person, so k = 2 can only use biden + obama."""
    pool_dir = tmp_path / "pool"
    (pool_dir / "biden").mkdir(parents=True)
    shutil.copy(fixture_path("biden.jpg"), pool_dir / "biden" / "biden.jpg")
    for name in ("obama.jpg", "obama2.jpg"):
        shutil.copy(fixture_path(name), pool_dir / name)
    m = create_method("k-same-average", k=2).setup("cpu")
    pool = m.build_pool(pool_dir, mtcnn, progress=False)
    assert len(pool) == 3 and pool.identity_mode == "folders+clustered"
    ident = {s.rsplit("/", 1)[-1]: i for s, i in zip(pool.sources, pool.identities)}
    assert ident["obama.jpg#0"] == ident["obama2.jpg#0"] != ident["biden.jpg#0"] == "biden"
    assert pool.n_identities == 2
    with pytest.raises(FaceprivError, match="only 2 pool identities"):
        create_method("k-same-average", k=3, model=None, pool=pool).apply(smooth_image(1), [FACE])
