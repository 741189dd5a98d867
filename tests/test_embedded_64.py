"""The 64x64 embedded model: a 32x32 bundle grown to a larger token grid, its config, bundle and probe lookup."""

from __future__ import annotations

import pathlib

import pytest
import torch

from catlab.embedded import world
from catlab.embedded.bundle import default_bundle_path, load_bundle, resolve_bundle_path
from catlab.embedded.denoiser import (
    POS_EMBED_KEY,
    DenoiserConfig,
    build_transformer,
    grow_pos_embed,
    load_grown,
    sincos_table,
)
from catlab.embedded.probe import attribute_accuracy, load_probe, probe_path_for

REPO = pathlib.Path(__file__).resolve().parents[1]
SMALL = dict(num_layers=1, num_heads=2, head_dim=8)


def small(image_size: int, **kw) -> torch.nn.Module:
    torch.manual_seed(image_size)
    return build_transformer(DenoiserConfig(image_size=image_size, **{**SMALL, **kw}), text_dim=16, pooled_dim=16)


def test_grown_transformer_keeps_every_other_weight_and_runs_at_the_new_size():
    src, dst = small(8), small(16)  # a 4x4 grid of 16 tokens -> 8x8 of 64
    grown = load_grown(dst, src.state_dict())
    assert grown == [POS_EMBED_KEY]
    a, b = src.state_dict(), dst.state_dict()
    assert set(a) == set(b)
    for k in a:
        if k != POS_EMBED_KEY:
            assert torch.equal(a[k], b[k]), k
    assert b[POS_EMBED_KEY].shape == (1, 64, 16)
    x = torch.randn(2, 3, 16, 16)
    out = dst(
        hidden_states=x,
        timestep=torch.tensor([500.0, 500.0]),
        encoder_hidden_states=torch.randn(2, 5, 16),
        pooled_projections=torch.randn(2, 16),
        return_dict=False,
    )[0]
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_grown_positions_cover_the_same_image_extent():
    old = sincos_table(16, torch.arange(4, dtype=torch.float32))
    assert torch.equal(grow_pos_embed(old, 4), old)
    new = grow_pos_embed(old, 8)
    # new patch i sits at old coordinate (i + 0.5) / 2 - 0.5: -0.25, 0.25, 0.75, ...
    expect = sincos_table(16, torch.arange(8, dtype=torch.float32) / 2 - 0.25)
    assert torch.allclose(new, expect)
    # a 2x2 block of new tokens averages close to the old token it subdivides
    blocks = new[0].reshape(4, 2, 4, 2, 16).mean(dim=(1, 3)).reshape(16, 16)
    assert (blocks - old[0]).abs().max() < 0.15
    # a table that is not sin-cos (e.g. learned) is resampled instead
    learned = torch.randn(1, 16, 16)
    assert grow_pos_embed(learned, 8).shape == (1, 64, 16)


def test_grown_table_survives_save_and_reload(tmp_path):
    from diffusers import SD3Transformer2DModel

    dst = small(16)
    load_grown(dst, small(8).state_dict())
    dst.save_pretrained(tmp_path, safe_serialization=True)
    back = SD3Transformer2DModel.from_pretrained(tmp_path)
    assert torch.equal(back.state_dict()[POS_EMBED_KEY], dst.state_dict()[POS_EMBED_KEY])


@pytest.mark.parametrize("change", [dict(num_layers=2), dict(head_dim=16), dict(patch_size=4)])
def test_incompatible_bundle_is_refused_with_the_reason(change):
    with pytest.raises(ValueError, match="missing|unexpected|shape mismatch|width"):
        load_grown(small(16, **change), small(8).state_dict())


def test_shipped_32_bundle_grows_into_the_64_config():
    from catlab.embedded.text import TextConfig, build_text_encoder, build_tokenizer
    from catlab.train_toy import load_weights

    tcfg = TextConfig(encoder="bert")  # as conf/train_toy.yaml and the shipped bundle
    text = build_text_encoder(tcfg, build_tokenizer(tcfg.max_length))
    big = build_transformer(DenoiserConfig(image_size=64), 128, 128)
    load_weights(default_bundle_path(), big, text)
    shipped = load_bundle()
    a, b = shipped.transformer.state_dict(), big.state_dict()
    assert b[POS_EMBED_KEY].shape == (1, 1024, 128) and a[POS_EMBED_KEY].shape == (1, 256, 128)
    assert all(torch.equal(a[k], b[k]) for k in a if k != POS_EMBED_KEY)
    t = shipped.text_encoder.state_dict()
    assert all(torch.equal(v, text.state_dict()[k]) for k, v in t.items())


def test_train_toy_64_config():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train_toy_64")
    assert cfg.denoiser.image_size == 64 and cfg.denoiser.patch_size == 2
    assert cfg.init_from == "catlab/embedded/bundle" and cfg.threads == 1
    assert cfg.sample_every and cfg.steps // cfg.sample_every >= 2  # an interrupted run leaves a bundle


def test_model_config_and_shipped_names(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(REPO / "conf" / "model" / "embedded_64.yaml")
    assert cfg.name == "embedded" and cfg.path == "bundle_64"
    assert resolve_bundle_path("bundle_64") == default_bundle_path().parent / "bundle_64"
    assert resolve_bundle_path(None) == default_bundle_path()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bundle_64").mkdir()  # a local directory of that name wins
    assert resolve_bundle_path("bundle_64") == pathlib.Path("bundle_64")
    assert probe_path_for(tmp_path / "elsewhere") == load_probe.__globals__["default_probe_path"]()


def test_probe_reads_rendered_64_scenes():
    scenes = world.sample_scenes(32, seed=321, branch=5)
    probe = load_probe(probe_path_for("bundle_64"))
    acc = attribute_accuracy(world.render(scenes, 64) * 2 - 1, scenes, probe)
    assert acc.mean() >= 0.98


@pytest.mark.skipif(
    not (default_bundle_path().parent / "bundle_64" / "transformer").exists(),
    reason="bundle_64 is not shipped in this checkout",
)
def test_shipped_64_bundle():
    root = default_bundle_path().parent / "bundle_64"
    assert sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) <= 25 * 2**20
    b = load_bundle("bundle_64")
    assert b.image_size == 64 and b.transformer.config.patch_size == 2
    assert (64 // 2) ** 2 == 1024
