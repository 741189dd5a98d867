"""The embedded default model: world, tokenizer, shipped bundle, training command, probe."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import warnings

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from catlab.embedded import world
from catlab.embedded.bundle import load_bundle, to_uint8
from catlab.embedded.probe import attribute_accuracy, load_probe
from catlab.embedded.text import build_tokenizer, tokenize
from tests.conftest import run_python

REPO = pathlib.Path(__file__).resolve().parents[1]
CAPTION = re.compile(
    r"^a (small|large) (\w+) (circle|square|triangle) in the ([a-z ]+?)"
    r"( and a (small|large) (\w+) (circle|square|triangle) in the ([a-z ]+))?$"
)


@pytest.fixture(scope="module")
def bundle():
    return load_bundle()


def test_world_is_deterministic_and_captioned():
    a, b = world.sample_scenes(16, seed=3), world.sample_scenes(16, seed=3)
    assert a == b
    assert torch.equal(world.render(a), world.render(b))
    assert a != world.sample_scenes(16, seed=4)
    for scene in a:
        assert CAPTION.match(scene.caption), scene.caption
        cells = [o.cell for o in scene.objects]
        assert 1 <= len(cells) <= 2 and len(set(cells)) == len(cells)
    img = world.render(a, size=32)
    assert img.shape == (16, 3, 32, 32) and 0 <= img.min() and img.max() <= 1


def test_caption_names_attributes():
    obj = world.SceneObject(shape=0, colour=0, size=0, cell=0)
    obj2 = world.SceneObject(shape=1, colour=2, size=1, cell=8)
    scene = world.Scene((obj, obj2), (0.1,) * 7, gradient=False)
    assert scene.caption == "a small red circle in the top left and a large blue square in the bottom right"


def test_heldout_is_fixed_and_apart_from_training():
    scenes, captions = world.heldout_scenes(50, seed=0)
    assert captions == world.heldout_scenes(50, seed=0)[1]
    assert captions == [s.caption for s in scenes]
    train = next(world.scene_stream(seed=0, batch_size=50))
    assert not set(scenes) & set(train)


def test_tokenizer_round_trip_and_unknown_word_warning(tmp_path):
    build_tokenizer().save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").exists()
    tok = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    caption = world.sample_scenes(1, seed=0)[0].caption
    ids = tokenize(tok, [caption, ""])
    assert ids.shape == (2, tok.model_max_length)
    assert tok.decode(ids[0], skip_special_tokens=True) == caption
    assert tok.unk_token_id not in ids[0].tolist()
    with pytest.warns(UserWarning, match="giraffe"):
        tokenize(tok, ["a small red giraffe in the center"])


def test_dropped_characters_are_named_once_and_punctuation_is_not():
    tok = build_tokenizer()
    with pytest.warns(UserWarning, match=r"characters \['★', '🙂'\] are dropped"):
        tokenize(tok, ["a red circle 🙂", "a blue square ★"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ASCII punctuation only separates words: no warning
        ids = tokenize(tok, ["a red circle, a blue square."])
    assert torch.equal(ids, tokenize(tok, ["a red circle a blue square"], warn=False))


def test_shipped_bundle_runs_a_denoising_step(bundle):
    from diffusers import FlowMatchEulerDiscreteScheduler

    assert bundle.image_size >= 32
    tokens = (bundle.image_size // bundle.transformer.config.patch_size) ** 2
    assert tokens >= 256
    embeds, pooled = bundle.encode(["a large green triangle in the center", ""])
    assert embeds.shape[-1] == bundle.transformer.config.joint_attention_dim
    assert pooled.shape == (2, bundle.transformer.config.pooled_projection_dim)
    x = torch.randn(2, 3, bundle.image_size, bundle.image_size, generator=torch.Generator().manual_seed(0))
    sched = FlowMatchEulerDiscreteScheduler.from_config(bundle.scheduler_config)
    sched.set_timesteps(4)
    t = sched.timesteps[0]
    with torch.no_grad():
        v = bundle.transformer(
            hidden_states=x, timestep=t.expand(2), encoder_hidden_states=embeds, pooled_projections=pooled
        ).sample
    assert v.shape == x.shape and torch.isfinite(v).all()
    x = sched.step(v, t, x).prev_sample
    assert to_uint8(x).shape == (2, bundle.image_size, bundle.image_size, 3)


def test_shipped_bundle_is_small():
    root = REPO / "catlab" / "embedded" / "bundle"
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert total <= 20 * 2**20


def test_probe_reads_rendered_scenes():
    scenes = world.sample_scenes(64, seed=123, branch=5)
    acc = attribute_accuracy(world.render(scenes) * 2 - 1, scenes, load_probe())
    assert acc.shape == (64,)
    assert acc.mean() >= 0.95
    blank = torch.full((64, 3, 32, 32), -1.0)  # nothing drawn: nothing found
    assert attribute_accuracy(blank, scenes).mean() < 0.2


@pytest.mark.slow
def test_training_command_runs(tmp_path):
    out = tmp_path / "run"
    small_cfg = [
        sys.executable, "-m", "catlab.train_toy", "steps=3", "batch_size=4",
        "denoiser.num_layers=1", "denoiser.num_heads=2", "denoiser.head_dim=16",
        "text.num_layers=1", "text.hidden_size=32", "log_every=1", "sample_every=2", "sample_steps=2",
    ]  # fmt: skip
    cmd = [*small_cfg, f"out_dir={out}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = run_python(cmd, cwd=REPO, env=env, clean=(out,))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "samples" / "step_000002.png").exists()
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 3
    small = load_bundle(out / "bundle")
    embeds, pooled = small.encode(["a small red circle in the top left"])
    assert embeds.shape == (1, 24, 32)

    # a continuation stage starts from that bundle's weights and records its parent
    more = tmp_path / "stage2"
    proc = run_python([*small_cfg, f"out_dir={more}", f"init_from={out / 'bundle'}", "seed=1"], cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads((more / "bundle" / "train_info.json").read_text())
    assert info["config"]["init_from"] == str(out / "bundle") and info["init_from_info"]["steps"] == 3
    # a bundle that does not fit the config is refused with the reason
    proc = subprocess.run(
        [*small_cfg, f"out_dir={tmp_path / 'bad'}", "denoiser.num_layers=2", f"init_from={out / 'bundle'}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "does not match this config" in proc.stderr


def test_weights_fingerprint_follows_the_weight_files(tmp_path):
    """Cached references and results are keyed by it: a retrained bundle must not meet the old ones."""
    import shutil

    from catlab.embedded.bundle import default_bundle_path, weights_fingerprint

    copy = tmp_path / "bundle"
    shutil.copytree(default_bundle_path(), copy, ignore=shutil.ignore_patterns("probe"))
    assert weights_fingerprint(copy) == weights_fingerprint()
    weights = next((copy / "transformer").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert weights_fingerprint(copy) != weights_fingerprint()


def test_text_encoders_causal_and_bidirectional():
    """clip: a word's state ignores the words after it; bert: it sees them. Both give (B, L, H) and (B, H)."""
    from catlab.embedded.text import TextConfig, build_text_encoder, encode_ids

    tokenizer = build_tokenizer(24)
    ids = tokenize(tokenizer, ["a small red circle in the top left", "a small red circle in the bottom right"])
    for kind, sees_later_words in (("clip", False), ("bert", True)):
        torch.manual_seed(0)
        encoder = build_text_encoder(
            TextConfig(hidden_size=32, num_layers=1, num_heads=2, encoder=kind), tokenizer
        ).eval()
        with torch.no_grad():
            states, pooled = encode_ids(encoder, ids)
        assert states.shape == (2, 24, 32) and pooled.shape == (2, 32)
        colour_word = 3  # <bos> a small red ...
        assert (not torch.allclose(states[0, colour_word], states[1, colour_word])) == sees_later_words
    with pytest.raises(ValueError, match="text.encoder must be one of"):
        TextConfig(encoder="t5")
