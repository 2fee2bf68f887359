"""facepriv patch: generator, placement, losses, training (tiny + real surrogates), apply, CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from conftest import fixture_path, load_rgb
from facepriv.core.align import TEMPLATES, invert_affine, landmarks_tensor, transform_points
from facepriv.patch import (
    PlacementEOT,
    GeneratorConfig,
    PatchApplier,
    PatchGenerator,
    PatchLossWeights,
    PatchTrainConfig,
    default_palette,
    get_region,
    non_printability,
    paste_patch,
    patch_objective,
    patch_to_photo,
    total_variation,
)
from facepriv.patch.placement import (
    color_jitter,
    compose,
    patch_coverage,
    photo_to_reference,
    place_on_canvas,
    random_placement_jitter,
)

TINY = dict(patch_size=32, input_size=64, base_channels=8, levels=3)


def _faces(n=3, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


def _landmarks_in(scale=1.8, angle=0.2, shift=(120.0, 60.0)):
    """Template landmarks put into a photo by a known similarity transform."""
    pts = torch.tensor(TEMPLATES["arcface-112"].points)
    c, s = math.cos(angle), math.sin(angle)
    rot = torch.tensor([[c, -s], [s, c]]) * scale
    return (pts @ rot.T + torch.tensor(shift))[None]


# ============================================================================ generator
@pytest.mark.parametrize("fusion", ["concat", "attention"])
def test_generator_shapes_range_and_one_pass_determinism(fusion):
    torch.manual_seed(0)
    gen = PatchGenerator(GeneratorConfig(fusion=fusion, **TINY)).eval()
    src, tgt = _faces(3), _faces(3, seed=1)
    with torch.no_grad():
        a = gen(src, tgt)
        b = gen(src, tgt)
        alone = gen(src[1:2], tgt[1:2])
        evasion = gen(src)
        mixed = gen(src, tgt, torch.tensor([True, False, True]))
    assert a.shape == (3, 3, 32, 32)
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    assert torch.equal(a, b)  # one forward pass, deterministic
    assert torch.allclose(alone[0], a[1], atol=1e-5)  # GroupNorm: a face's patch ignores the batch
    assert not torch.allclose(evasion, a)  # the target conditions the patch
    assert torch.allclose(mixed[1], evasion[1], atol=1e-6) and torch.allclose(mixed[0], a[0], atol=1e-6)
    # other input sizes are resized to input_size
    with torch.no_grad():
        assert gen(torch.rand(2, 3, 112, 112)).shape == (2, 3, 32, 32)


def test_generator_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    gen = PatchGenerator(GeneratorConfig(region="eyeglass", **TINY)).eval()
    with torch.no_grad():
        for p in gen.parameters():  # make the output non-trivial
            p.add_(torch.randn_like(p) * 0.05)
    gen.save_pretrained(tmp_path / "gen")
    files = sorted(p.name for p in (tmp_path / "gen").iterdir())
    assert files == ["config.json", "generator.safetensors"]
    meta = json.loads((tmp_path / "gen" / "config.json").read_text())
    assert meta["format"] == "facepriv-patch-generator" and meta["config"]["region"] == "eyeglass"
    loaded = PatchGenerator.from_pretrained(tmp_path / "gen")
    src, tgt = _faces(2), _faces(2, seed=3)
    with torch.no_grad():
        assert torch.equal(gen(src, tgt), loaded(src, tgt))
    assert loaded.config == gen.config and not any(p.requires_grad for p in loaded.parameters())
    from facepriv.core.errors import ConfigError

    with pytest.raises(ConfigError):
        PatchGenerator.from_pretrained(tmp_path)  # not a generator folder
    with pytest.raises(ConfigError):
        GeneratorConfig(patch_size=48)


# ============================================================================ placement
@pytest.mark.parametrize("region", ["forehead", "eyeglass", "cheek"])
def test_placement_lands_in_the_landmark_region_and_leaves_the_rest_exact(region):
    """Pasted into a photo through the inverse alignment: only region pixels change."""
    torch.manual_seed(0)
    H, W = 300, 400
    image = torch.rand(3, H, W)
    lms = _landmarks_in()
    reg = get_region(region)
    P = 32
    patch = torch.rand(1, 3, P, P)
    mats = patch_to_photo(reg, P, lms)
    out = paste_patch(image, patch, reg, mats)
    changed = (out != image).any(0)
    inside = reg.image_mask(lms, (H, W))[0] > 0  # the region, from the landmarks alone
    assert changed.sum() > 0.95 * inside.sum()
    assert not (changed & ~inside).any()
    # exactly invertible outside the patch: alpha == 0 -> bit-for-bit the input
    alpha = patch_coverage((H, W), reg, P, mats)[0]
    assert torch.equal(alpha > 0, inside)
    assert torch.equal(out[:, alpha == 0], image[:, alpha == 0])
    # and the covered area sits where the region says, relative to the landmarks
    ys, xs = torch.nonzero(changed, as_tuple=True)
    centre = torch.stack([xs.float().mean(), ys.float().mean()])[None, None]
    ref_centre = transform_points(photo_to_reference(lms), centre)[0, 0]  # back in the template frame
    x0, y0, x1, y1 = reg.rect
    assert x0 < ref_centre[0] < x1 and y0 < ref_centre[1] < y1
    eye_y = TEMPLATES["arcface-112"].points[0][1]
    mouth_y = TEMPLATES["arcface-112"].points[3][1]
    if region == "forehead":
        assert ref_centre[1] < eye_y - 10
    if region == "cheek":
        assert eye_y < ref_centre[1] < mouth_y


def test_placement_patch_pixels_map_through_the_matrices():
    """A single bright patch pixel appears at the photo position the matrices predict."""
    H, W = 300, 400
    lms = _landmarks_in(scale=3.0, angle=-0.3)
    reg = get_region("forehead", feather=0.0)
    P = 16
    patch = torch.zeros(1, 3, P, P)
    u, v = 8, 6
    patch[0, :, v, u] = 1.0
    mats = patch_to_photo(reg, P, lms)
    out = paste_patch(torch.zeros(3, H, W), patch, reg, mats)
    img = out[0]
    yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    cx, cy = float((img * xx).sum() / img.sum()), float((img * yy).sum() / img.sum())
    want = transform_points(mats, torch.tensor([[[float(u), float(v)]]]))[0, 0]
    assert abs(cx - float(want[0])) < 0.3 and abs(cy - float(want[1])) < 0.3


def test_user_mask_region(tmp_path):
    """A white rectangle drawn in the aligned frame is where the patch goes."""
    arr = np.zeros((224, 224), np.uint8)
    arr[40:80, 100:180] = 255  # at 224 px: reference frame x 50..90, y 20..40
    Image.fromarray(arr).save(tmp_path / "mask.png")
    reg = get_region(str(tmp_path / "mask.png"))
    assert reg.rect == pytest.approx((49.5, 19.5, 89.5, 39.5), abs=0.01)
    tpl = TEMPLATES["arcface-112"]
    lms = torch.tensor(tpl.points)[None]  # a face already in the reference frame
    out = paste_patch(torch.zeros(3, 112, 112), torch.ones(1, 3, 16, 16), reg, patch_to_photo(reg, 16, lms))
    changed = out[0] > 0
    ys, xs = torch.nonzero(changed, as_tuple=True)
    assert 49 <= int(xs.min()) and int(xs.max()) <= 90 and 19 <= int(ys.min()) and int(ys.max()) <= 40
    assert changed.sum() > 0.9 * 40 * 20
    from facepriv.core.errors import ConfigError

    Image.fromarray(np.zeros((50, 50), np.uint8)).save(tmp_path / "empty.png")
    with pytest.raises(ConfigError):
        get_region(str(tmp_path / "empty.png"))
    with pytest.raises(ConfigError):
        get_region("nose-ring")


def test_eot_jitter_is_small_random_and_differentiable():
    reg = get_region("forehead")
    torch.manual_seed(0)
    m = random_placement_jitter(16, reg, PlacementEOT())
    eye = torch.eye(2, 3).expand(16, 2, 3)
    assert m.shape == (16, 2, 3) and not torch.allclose(m[0], m[1])
    assert (m[:, :, :2] - eye[:, :, :2]).abs().max() < 0.15
    assert torch.equal(random_placement_jitter(4, reg, PlacementEOT(enabled=False)), torch.eye(2, 3).expand(4, 2, 3))
    patch = torch.full((4, 3, 16, 16), 0.5, requires_grad=True)
    out = color_jitter(patch, PlacementEOT())
    assert out.shape == patch.shape and float(out.detach().min()) >= 0 and float(out.detach().max()) <= 1
    out.sum().backward()
    assert patch.grad is not None and patch.grad.abs().sum() > 0
    # canvas compositing is differentiable in the patch
    canvas = torch.rand(2, 3, 120, 120)
    lms = torch.tensor(TEMPLATES["arcface-112"].points).expand(2, 5, 2)
    p = torch.rand(2, 3, 16, 16, requires_grad=True)
    mats = compose(invert_affine(photo_to_reference(lms)),
                   compose(random_placement_jitter(2, reg, PlacementEOT()), reg.patch_to_reference(16).expand(2, 2, 3)))
    patched, alpha = place_on_canvas(canvas, p, reg, mats)
    patched.sum().backward()
    assert p.grad.abs().sum() > 0 and torch.equal(patched[alpha.expand_as(patched) == 0], canvas[alpha.expand_as(canvas) == 0])


# ============================================================================ losses
def test_tv_and_printability():
    flat = torch.full((2, 3, 16, 16), 0.3)
    noisy = torch.rand(2, 3, 16, 16)
    assert torch.allclose(total_variation(flat), torch.zeros(2)) and (total_variation(noisy) > 0.3).all()
    pal = default_palette()
    assert pal.shape == (27, 3)
    on_palette = pal[5].view(1, 3, 1, 1).expand(1, 3, 8, 8)
    assert float(non_printability(on_palette, pal)) < 1e-6
    assert float(non_printability(torch.ones(1, 3, 8, 8), pal)) == pytest.approx(math.sqrt(3 * 0.01), abs=1e-4)


def test_objective_push_only_without_target_and_pull_with():
    emb = {"m": torch.tensor([[1.0, 0.0], [0.0, 1.0]])}
    src = {"m": torch.tensor([[1.0, 0.0], [1.0, 0.0]])}
    tgt = {"m": torch.tensor([[0.0, 1.0], [0.0, 1.0]])}
    patch = torch.full((2, 3, 8, 8), 0.5)
    w = PatchLossWeights(pull=1.0, push=1.0, tv=0.0)
    t = patch_objective(emb, src, None, None, patch, w)
    assert torch.allclose(t["identity"], torch.tensor([1.0, 0.0]))  # cos to source
    t = patch_objective(emb, src, tgt, torch.tensor([True, False]), patch, w)
    # row 0: (1 - cos(x, t)) + cos(x, s) = 1 + 1; row 1 (evasion): cos(x, s) = 0
    assert torch.allclose(t["identity"], torch.tensor([2.0, 0.0]))


# ============================================================================ training (mechanics)
class _TinyFR(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 5, stride=4), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 32))

    def forward(self, x):
        return self.net(x)


def _tiny_ensemble():
    from facepriv.attacks.identity import SurrogateEnsemble
    from facepriv.models import get_spec
    from facepriv.models.recognition import FaceRecognizer

    torch.manual_seed(0)
    spec = dataclasses.replace(get_spec("sface"), name="tiny-fr")
    return SurrogateEnsemble([], models=[FaceRecognizer(spec, _TinyFR(), lambda x: x * 2 - 1)])


@pytest.fixture(scope="module")
def photo_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("patchdata")
    (root / "data").mkdir()
    (root / "targets").mkdir()
    for n in ("obama.jpg", "obama2.jpg"):
        shutil.copy(fixture_path(n), root / "data" / n)
    shutil.copy(fixture_path("biden.jpg"), root / "targets" / "biden.jpg")
    return root


def _fake_detector():
    """Landmarks from a fixed, plausible placement (no detector model needed)."""
    class Det:
        name = "fake"

        def detect(self, rgb):
            from facepriv.core.faces import Face

            h, w = rgb.shape[:2]
            s = min(h, w) / 200.0
            pts = (torch.tensor(TEMPLATES["arcface-112"].points) * s + torch.tensor([w / 2 - 56 * s, h / 3 - 40 * s]))
            return [Face(np.array([0, 0, w, h], np.float32), pts.numpy().astype(np.float32), 0.99)]

    return Det()


def _train_cfg(tmp_path, photo_dirs, **kw):
    base = dict(data=[str(photo_dirs / "data")], targets=[str(photo_dirs / "targets")], out=str(tmp_path / "gen"),
                epochs=2, batch_size=2, lr=5e-3, generator=GeneratorConfig(**TINY), evasion_prob=0.0,
                weights=PatchLossWeights(tv=0.01))
    base.update(kw)
    return PatchTrainConfig(**base)


def test_training_checkpoints_and_resume_reproduce_a_straight_run(tmp_path, photo_dirs):
    from facepriv.patch.train import PatchTrainer

    def run(out, epochs, resume=False):
        cfg = _train_cfg(tmp_path, photo_dirs, out=str(out), epochs=epochs)
        torch.manual_seed(0)
        tr = PatchTrainer(cfg, device="cpu", progress=False, surrogates=_tiny_ensemble(), detector=_fake_detector())
        return tr.fit(resume=resume)

    straight = run(tmp_path / "a", 2)
    assert [h["epoch"] for h in straight.history] == [1, 2] and straight.steps == 2
    for f in ("config.json", "generator.safetensors", "train_state.safetensors", "train_state.json"):
        assert (tmp_path / "a" / f).is_file()
    assert list((tmp_path / "a" / "cache").glob("data-*.safetensors"))
    run(tmp_path / "b", 1)
    resumed = run(tmp_path / "b", 2, resume=True)
    assert resumed.resumed_from == 1 and [h["epoch"] for h in resumed.history] == [1, 2]
    ga = PatchGenerator.from_pretrained(tmp_path / "a")
    gb = PatchGenerator.from_pretrained(tmp_path / "b")
    for (k, va), vb in zip(ga.trainable_state_dict().items(), gb.trainable_state_dict().values()):
        assert torch.allclose(va, vb, atol=1e-6), k
    # other settings in the same folder are refused on resume
    from facepriv.core.errors import ConfigError

    cfg = _train_cfg(tmp_path, photo_dirs, out=str(tmp_path / "b"), epochs=3, lr=1e-2)
    with pytest.raises(ConfigError):
        PatchTrainer(cfg, device="cpu", progress=False, surrogates=_tiny_ensemble(),
                     detector=_fake_detector()).fit(resume=True)


# ============================================================================ training (real surrogates)
class _MemoDetector:
    """MTCNN, detecting each distinct image once per test."""

    def __init__(self, det):
        self.det, self.seen = det, {}

    def detect(self, rgb):
        key = (rgb.shape, hash(rgb[::7, ::7].tobytes()))
        if key not in self.seen:
            self.seen[key] = self.det.detect(rgb)
        return self.seen[key]


@pytest.mark.slow
@pytest.mark.realmodels
def test_push_and_pull_move_the_right_way_with_real_surrogates(tmp_path, photo_dirs, mtcnn):
    """A few steps on real fixture faces against dlib-resnet + facenet-casia: the patched faces
    move away from their own identity (evasion) and towards the target (impersonation)."""
    from facepriv.attacks.identity import SurrogateEnsemble
    from facepriv.patch.train import PatchTrainer

    sur = SurrogateEnsemble(["dlib-resnet", "facenet-casia"])
    det = _MemoDetector(mtcnn)
    results = {}
    for mode in ("evasion", "impersonation"):
        torch.manual_seed(0)
        cfg = _train_cfg(tmp_path, photo_dirs, out=str(tmp_path / mode), epochs=4, lr=1e-2,
                         targets=None if mode == "evasion" else [str(photo_dirs / "targets")],
                         eot=PlacementEOT(enabled=False), generator=GeneratorConfig(region="eyeglass", **TINY))
        tr = PatchTrainer(cfg, device="cpu", progress=False, surrogates=sur, detector=det)
        idx = torch.arange(len(tr.faces))
        with torch.no_grad():
            torch.manual_seed(1)
            before = tr.batch_loss(idx, train=False)
        tr.fit()
        with torch.no_grad():
            torch.manual_seed(1)
            after = tr.batch_loss(idx, train=False)
        results[mode] = (before, after)
    b, a = results["evasion"]
    assert float(a["cos_source"].mean()) < float(b["cos_source"].mean()) - 0.01
    b, a = results["impersonation"]
    assert float(a["cos_target"].mean()) > float(b["cos_target"].mean()) + 0.01
    assert float(a["identity"].mean()) < float(b["identity"].mean())


# ============================================================================ natural mode
def _tiny_taesd(path: Path):
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    ae = AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                         num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1), latent_channels=4)
    ae.save_pretrained(path)
    return ae


def test_natural_mode_decodes_patches_through_a_registry_autoencoder(tmp_path):
    ae = _tiny_taesd(tmp_path / "taesd")
    torch.manual_seed(0)
    gen = PatchGenerator(GeneratorConfig(natural=True, autoencoder=str(tmp_path / "taesd"), **TINY))
    cfg = gen.config
    assert cfg.autoencoder_model == "taesd" and cfg.latent_channels == 4 and cfg.latent_factor == 8
    src = _faces(2)
    patch, latent = gen(src, return_latent=True)
    assert patch.shape == (2, 3, 32, 32) and latent.shape == (2, 4, 4, 4)
    assert float(latent.detach().abs().max()) <= cfg.latent_scale
    with torch.no_grad():
        direct = ((ae.decode(latent).sample + 1) / 2).clamp(0, 1)
    assert torch.allclose(patch, direct, atol=1e-5)  # the patch IS the autoencoder's decoding
    patch.mean().backward()
    grads = [p.grad for n, p in gen.named_parameters() if not n.startswith("latent.") and p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in gen.latent.parameters())  # the autoencoder stays frozen
    # save/load: self-contained folder, autoencoder loaded back through the registry
    gen.eval()
    gen.save_pretrained(tmp_path / "gen")
    assert (tmp_path / "gen" / "autoencoder" / "config.json").is_file()
    shutil.rmtree(tmp_path / "taesd")
    loaded = PatchGenerator.from_pretrained(tmp_path / "gen")
    with torch.no_grad():
        assert torch.allclose(gen(src), loaded(src), atol=1e-6)


def test_natural_mode_default_hub_id_and_latent_prior(tmp_path, monkeypatch):
    """Default autoencoder = madebyollin/taesd (a faked hub cache here), and the score-distillation
    prior from a latent UNet (tiny, self-made) gives gradients to the latent only."""
    from diffusers import DDPMScheduler, UNet2DModel

    from facepriv.patch.losses import load_latent_prior

    cache = tmp_path / "hf"
    snap = cache / "models--madebyollin--taesd" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    _tiny_taesd(snap)
    (cache / "models--madebyollin--taesd" / "refs").mkdir()
    (cache / "models--madebyollin--taesd" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    gen = PatchGenerator(GeneratorConfig(natural=True, **TINY))
    assert gen.config.autoencoder_model == "taesd"
    gen2 = PatchGenerator(GeneratorConfig(natural=True, autoencoder="madebyollin/taesd", **TINY))
    assert gen2.config.latent_channels == 4

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=4, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8)
    unet.save_pretrained(tmp_path / "prior" / "unet")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(tmp_path / "prior" / "scheduler")
    prior = load_latent_prior(str(tmp_path / "prior"))
    patch, latent = gen(_faces(2), return_latent=True)
    loss = prior(latent)
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    loss.sum().backward()
    assert all(p.grad is None for p in prior.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in gen.named_parameters()
               if not n.startswith("latent."))
    from facepriv.core.errors import ConfigError

    with pytest.raises(ConfigError):
        prior(torch.zeros(1, 3, 4, 4))


# ============================================================================ apply
def _noisy_generator(tmp_path, region="forehead"):
    torch.manual_seed(0)
    gen = PatchGenerator(GeneratorConfig(region=region, **TINY)).eval()
    with torch.no_grad():
        gen.decoder.head.weight.normal_(0, 0.5)
    gen.save_pretrained(tmp_path / "gen")
    return tmp_path / "gen"


@pytest.mark.realmodels
def test_apply_end_to_end_on_a_group_photo(tmp_path, mtcnn):
    """All six faces patched, every other pixel of the photo unchanged (PNG output)."""
    from facepriv.core.faces import FacePolicy
    from facepriv.core.photo import SaveOptions
    from facepriv.patch import PatchApplyConfig, run_patch_apply

    gen_dir = _noisy_generator(tmp_path)
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(fixture_path("group.jpg"), src / "group.jpg")
    summary = run_patch_apply([src], tmp_path / "out", PatchApplyConfig(generator=str(gen_dir)),
                              policy=FacePolicy(min_face_size=20), save=SaveOptions(), output_suffix=".png",
                              progress=False)
    assert summary.counts == {"ok": 1}
    rows = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert rows[0]["faces"] == 6 and rows[0]["mode"] == "evasion"
    before = load_rgb("group.jpg")
    after = np.asarray(Image.open(tmp_path / "out" / "group.png").convert("RGB"))
    faces = FacePolicy(min_face_size=20).select(mtcnn.detect(before))
    lms = landmarks_tensor(faces)
    gen = PatchGenerator.from_pretrained(gen_dir)
    alpha = patch_coverage(before.shape[:2], gen.region, 32, patch_to_photo(gen.region, 32, lms))
    covered = (alpha > 0).any(0).numpy()
    diff = (after != before).any(-1)
    assert not diff[~covered].any()  # exactly unchanged outside the patches
    for i in range(len(faces)):  # and every face got its patch
        assert diff[(alpha[i] > 0.5).numpy()].mean() > 0.5
    # resume skips the finished file
    again = run_patch_apply([src], tmp_path / "out", PatchApplyConfig(generator=str(gen_dir)),
                            policy=FacePolicy(min_face_size=20), save=SaveOptions(), output_suffix=".png",
                            resume=True, progress=False)
    assert again.resumed == 1


@pytest.mark.realmodels
def test_apply_with_target_differs_and_batches_match_single(tmp_path, mtcnn):
    gen_dir = _noisy_generator(tmp_path, region="cheek")
    rgb = load_rgb("obama.jpg")
    x = torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255
    lms = landmarks_tensor(mtcnn.detect(rgb)[:1])
    ev = PatchApplier(gen_dir)
    im = PatchApplier(gen_dir, target=str(fixture_path("biden.jpg")), detector=mtcnn)
    assert ev.mode == "evasion" and im.mode == "impersonation"
    a, b = ev.apply(x, lms), im.apply(x, lms)
    assert not torch.equal(a, b)
    many = ev.apply_many([x, x], [lms, lms])
    assert (many[0] - a).abs().max() < 1e-4 and (many[1] - a).abs().max() < 1e-4


# ============================================================================ CLI
@pytest.mark.realmodels
def test_cli_train_then_apply(tmp_path, photo_dirs, mtcnn):
    """Train and apply through the CLI; every pixel outside the pasted patches is unchanged."""
    from typer.testing import CliRunner

    from facepriv.cli import app
    from facepriv.core.faces import FacePolicy

    runner = CliRunner()
    gen = tmp_path / "gen"
    r = runner.invoke(app, ["--quiet", "--json", "patch", "train", "--data", str(photo_dirs / "data"),
                            "--surrogates", "dlib-resnet", "--epochs", "1", "--batch-size", "2", "--patch-size", "32",
                            "--channels", "8", "--region", "forehead", "--out", str(gen)])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["epochs"] == 1 and rep["faces"] == 2 and rep["targets"] == 0
    r = runner.invoke(app, ["--quiet", "patch", "apply", str(photo_dirs / "data"), "--generator", str(gen),
                            "--target", str(photo_dirs / "targets" / "biden.jpg"), "--out", str(tmp_path / "out"),
                            "--format", "png", "--photo-batch", "2"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["obama.png", "obama2.png"]
    g = PatchGenerator.from_pretrained(gen)
    P = g.config.patch_size
    for name in ("obama", "obama2"):
        before = load_rgb(f"{name}.jpg")
        after = np.asarray(Image.open(tmp_path / "out" / f"{name}.png").convert("RGB"))
        faces = FacePolicy(min_face_size=20).select(mtcnn.detect(before))
        alpha = patch_coverage(before.shape[:2], g.region, P, patch_to_photo(g.region, P, landmarks_tensor(faces)))
        covered = (alpha > 0).any(0).numpy()
        diff = (after != before).any(-1)
        assert diff.any() and not diff[~covered].any(), name  # patched, and bit-for-bit the same elsewhere
    rows = [json.loads(x) for x in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert all("dlib-resnet" in a["passed"] for r_ in rows for a in r_["attack"])  # verified by default
    r = runner.invoke(app, ["--quiet", "patch", "apply", str(photo_dirs / "data"), "--generator", str(gen),
                            "--out", str(tmp_path / "unverified"), "--format", "png", "--no-verify"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in (tmp_path / "unverified" / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r_["status"] == "ok" and "attack" not in r_ for r_ in rows)
    r = runner.invoke(app, ["patch", "apply", str(photo_dirs / "data"), "--generator", str(tmp_path / "nope"),
                            "--out", str(tmp_path / "o2")])
    assert r.exit_code == 2


# ============================================================================ PGD baseline
def test_per_image_pgd_patch_lowers_the_objective_and_touches_only_the_region():
    from facepriv.patch.pgd import optimize_patches

    sur = _tiny_ensemble()
    torch.manual_seed(0)
    H, W = 300, 400
    image = torch.rand(3, H, W)
    lms = _landmarks_in()
    out, patch = optimize_patches(image, lms, sur, region="cheek", patch_size=16, steps=0)
    out2, patch2 = optimize_patches(image, lms, sur, region="cheek", patch_size=16, steps=8)
    assert patch2.shape == (1, 3, 16, 16) and not torch.equal(patch, patch2)
    ref = sur.reference(image, lms)

    def cos(x):
        emb = sur.embed(x, lms)
        return float(torch.nn.functional.cosine_similarity(emb["tiny-fr"], ref["tiny-fr"]))

    with torch.no_grad():
        assert cos(out2) < cos(out)
    inside = get_region("cheek").image_mask(lms, (H, W))[0] > 0
    assert torch.equal(out2[:, ~inside], image[:, ~inside])
