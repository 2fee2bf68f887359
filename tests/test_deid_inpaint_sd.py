"""Generative de-identification through a diffusers inpainting pipeline (Stable-Diffusion style),
with a tiny self-made pipeline: 9-channel UNet2DConditionModel, AutoencoderKL, CLIP text encoder
and a byte-level BPE CLIP tokenizer built offline from a vocab.json / merges.txt written here."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from facepriv.core.errors import ConfigError  # noqa: E402
from facepriv.deid import create_method  # noqa: E402
from facepriv.deid.generative import inpaint_pipeline_class  # noqa: E402
from test_deid_classical import make_face, textured  # noqa: E402
from test_deid_generative import scripted_guard, support  # noqa: E402

REPO = "tiny-org/tiny-sd-inpaint"
COMMIT = "1" * 40


def byte_symbols() -> list[str]:
    """The 256 printable symbols byte-level BPE (GPT-2 / CLIP) uses for the bytes 0..255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    return [table[b] for b in range(256)]


def tiny_tokenizer(folder):
    """A CLIP tokenizer over single bytes plus a few merges ("face</w>" is one token)."""
    from transformers import CLIPTokenizer

    syms = byte_symbols()
    vocab = {s: i for i, s in enumerate(syms)}
    vocab.update({s + "</w>": 256 + i for i, s in enumerate(syms)})
    merges = ["f a", "fa c", "fac e</w>", "o f</w>"]
    for m in merges:
        vocab["".join(m.split())] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=16), vocab


def tiny_sd_inpaint(path):
    """Save a tiny StableDiffusionInpaintPipeline (32 x 32 output) to ``path``."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tok, vocab = tiny_tokenizer(path.parent / f"{path.name}-tok")
    ids = tok("a photo of a face").input_ids
    assert tok.convert_ids_to_tokens(ids)[-2:] == ["face</w>", "<|endoftext|>"]
    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=16, projection_dim=32, bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"]))
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=9, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, sample_size=32)
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionInpaintPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                          safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A Hugging Face hub cache holding the tiny pipeline as ``tiny-org/tiny-sd-inpaint``."""
    root = tmp_path_factory.mktemp("hf")
    repo = root / ("models--" + REPO.replace("/", "--"))
    tiny_sd_inpaint(repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return root


@pytest.fixture
def offline_hub(hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub_cache


FAST = dict(steps=3, guard_model=None, expression_guard=False)


def sd(ref, **kw):
    return create_method("inpaint", score_model=ref, **{**FAST, **kw}).setup("cpu")


def test_sd_inpainting_pipeline_by_hub_id_keeps_everything_but_the_inner_face(offline_hub):
    m = sd(REPO)
    assert m.backend.kind == "inpaint-pipeline" and m.resolution == 32 and m.template.name == "celebahq-256"
    assert type(m.pipe).__name__ == "StableDiffusionInpaintPipeline"
    x = textured(256, 256)
    faces = [make_face(90, 110, 100), make_face(190, 150, 80, roll=0.2)]
    y = m.apply(x, faces)
    assert y.shape == x.shape and not torch.equal(x, y)
    sup = support(m, x, faces)
    assert torch.equal(y[:, ~sup], x[:, ~sup])  # the latent round trip leaks nowhere outside the ellipse
    changed = (y != x).any(0)
    for f in faces:
        cx, cy = f.landmarks[2]
        assert bool(changed[int(cy), int(cx)])
    info = m.last_info
    assert info["backend"] == "inpaint-pipeline" and info["pipeline"] == "StableDiffusionInpaintPipeline"
    assert [f["tries"] for f in info["faces"]] == [1, 1]
    d = m.describe()
    assert d["prompt"] == "a photo of a face" and d["backend"] == "inpaint-pipeline"
    # reproducible with the seed; the seed and the prompt both reach the model
    assert torch.equal(y, m.apply(x, faces))
    m.seed = 1
    assert not torch.equal(y, m.apply(x, faces))
    m.seed, m.prompt = 0, "a smiling face"
    assert not torch.equal(y, m.apply(x, faces))


def test_sd_pipeline_from_a_folder_with_the_identity_guard_and_fallback(offline_hub, monkeypatch):
    folder = offline_hub / ("models--" + REPO.replace("/", "--")) / "snapshots" / COMMIT
    assert inpaint_pipeline_class(folder) == "StableDiffusionInpaintPipeline"
    x = textured(256, 256)
    faces = [make_face(128, 128, 120)]
    m = sd(str(folder), guard_tries=3, guidance_scale=1.0)
    sims = [[0.9], [0.8], [0.2]]  # the third try no longer matches
    outputs = scripted_guard(m, monkeypatch, sims)
    m.apply(x, faces)
    info = m.last_info["faces"][0]
    assert info["tries"] == 3 and info["identity_ok"] is True and info["fallback"] is None and len(outputs) == 3
    assert not torch.equal(outputs[0], outputs[1])  # the seed advanced
    m2 = sd(str(folder), guard_tries=2, guard_fallback="pixelate")
    scripted_guard(m2, monkeypatch, [[0.9], [0.9], [0.3]])
    y = m2.apply(x, faces)
    assert m2.last_info["faces"][0]["fallback"] == ["pixelate"]
    assert torch.equal(y, create_method("pixelate", strength=2.0).apply(x, faces))


def test_pipelines_that_are_not_inpainting_are_refused(tmp_path):
    folder = tmp_path / "txt2img"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (folder / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", "in_channels": 4}))
    assert inpaint_pipeline_class(folder) is None
    with pytest.raises(ConfigError, match="neither an inpainting pipeline"):
        sd(str(folder))
    # a 9-channel UNet makes a pipeline an inpainting one whatever its class name says
    (folder / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", "in_channels": 9}))
    assert inpaint_pipeline_class(folder) == "StableDiffusionPipeline"
