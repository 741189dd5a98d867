"""One route for every component kind: a module that registers it, plus its YAML; no edit to catlab.

A temporary package (outside the repository, put on ``sys.path``) holds what a contributor
would write: a step cache ("every other step": after a warm-up, the odd steps run the
transformer and the even ones reuse its last output) and a model family (PixArt-α, diffusers'
``Transformer2DModel`` with ``ada_norm_single`` blocks, which no module of catlab knows),
each with its YAML in the package's ``conf/``. The tests import the package as catlab's
plugin loader would, compose a run config with Hydra from catlab's ``conf/`` plus the
package's, and run it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from catlab.pruning import TokenPruner, family_of
from catlab.registry import families, models, stepcaches
from tests.conftest import ROOT
from tests.family_checks import assert_macs_match_the_flop_counter

STEP_CACHE = '''
"""Every other step: steps 1..start_step run the transformer, then the odd steps do and the even ones
reuse the last output it gave (the simplest step cache; FORA and TaylorSeer refine it)."""

import contextlib
from dataclasses import dataclass
from typing import ClassVar

from diffusers.hooks import HookRegistry, ModelHook

from catlab.stepcache import StepCache, stepcaches

HOOK = "every_other_step"


class _Reuse(ModelHook):
    _is_stateful = True

    def __init__(self, cache):
        super().__init__()
        self.cache, self.output = cache, None

    def new_forward(self, module, *args, **kwargs):
        if self.output is None or self.cache.computes(self.cache.step):
            self.output = self.fn_ref.original_forward(*args, **kwargs)
        return self.output

    def reset_state(self, module):
        self.output = None
        return module


@stepcaches.register("every_other")
@dataclass
class EveryOther(StepCache):
    start_step: int = 2

    hook_names: ClassVar[tuple[str, ...]] = (HOOK,)

    def _apply(self, transformer):
        self.step = 1
        HookRegistry.check_if_exists_or_initialize(transformer).register_hook(_Reuse(self), HOOK)

    @contextlib.contextmanager
    def context(self, step, num_steps, **info):
        self.step = step
        yield

    def computes(self, step):
        return step <= self.start_step or (step - self.start_step) % 2 == 1
'''

FAMILY = '''
"""PixArt-α, one module: diffusers' ``Transformer2DModel`` with ``ada_norm_single`` blocks, the layout
PixArt-Σ kept; its spec, its MACs (PixArt-Σ's formula holds) and a tiny random-weight adapter."""

from dataclasses import dataclass

from diffusers import DPMSolverMultistepScheduler, Transformer2DModel

from catlab.families.pixart import check_pixart, pixart_macs
from catlab.models.tiny import TinyAdapter
from catlab.pruning.families import FamilySpec
from catlab.pruning.processors import PrunedSelfAttnProcessor
from catlab.registry import families, models

PIXART_ALPHA = families.register("pixart_alpha")(
    FamilySpec(
        name="pixart_alpha",
        transformer_type="Transformer2DModel",
        block_type="BasicTransformerBlock",
        attentions=(("attn1", PrunedSelfAttnProcessor),),
        macs=pixart_macs,
        check=check_pixart,
    )
)


@models.register("tiny_pixart_alpha")
@dataclass
class TinyPixArtAlpha(TinyAdapter):
    def build(self):
        return Transformer2DModel(
            num_attention_heads=self.num_heads,
            attention_head_dim=self.head_dim,
            in_channels=3,
            out_channels=6,
            num_layers=self.num_layers,
            sample_size=max(self.height, self.width),
            patch_size=self.patch,
            norm_type="ada_norm_single",
            num_embeds_ada_norm=1000,
            cross_attention_dim=self.num_heads * self.head_dim,
            caption_channels=self.text_dim,
        )

    def make_scheduler(self):
        return DPMSolverMultistepScheduler()

    def conditioning(self, embeds, pooled):
        return dict(encoder_hidden_states=embeds)

    def predict(self, latents, timestep, cond):
        t = timestep.expand(latents.shape[0])
        extra = {"resolution": None, "aspect_ratio": None}
        out = self.transformer(latents, timestep=t, added_cond_kwargs=extra, return_dict=False, **cond.kwargs)[0]
        return out[:, : latents.shape[1]]  # drop the learned variance
'''

YAML = {
    "model/tiny_pixart_alpha.yaml": """
        # PixArt-α in miniature (seeded random weights): a family added as one module of a plugin
        name: tiny_pixart_alpha
        device: cpu
        dtype: float32
        height: 16
        width: 16
        num_layers: 2
        num_heads: 2
        head_dim: 16
        text_dim: 24
        """,
    "stepcache/every_other.yaml": """
        # after the warm-up, every other step reuses the transformer's last output
        name: every_other
        start_step: 2
        """,
}

PROMPTS = ["a red circle", "a blue square"]


def write_plugin(root):
    """The contributor's files: ``route_plugin/{every_other,pixart_alpha}.py`` and its ``conf/`` folder."""
    package = root / "route_plugin"
    (package / "conf").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "every_other.py").write_text(STEP_CACHE)
    (package / "pixart_alpha.py").write_text(FAMILY)
    (package / "conf" / "__init__.py").write_text("")
    for name, text in YAML.items():
        (package / "conf" / name).parent.mkdir(exist_ok=True)
        (package / "conf" / name).write_text(textwrap.dedent(text).lstrip())
    return package


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """The temporary package, imported; every registry it touched is put back afterwards."""
    for registry in (families, models, stepcaches):
        monkeypatch.setattr(registry, "_entries", dict(registry._entries))
    write_plugin(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield __import__("route_plugin.every_other").every_other, __import__("route_plugin.pixart_alpha").pixart_alpha
    for name in ("route_plugin", "route_plugin.every_other", "route_plugin.pixart_alpha"):
        sys.modules.pop(name, None)


def test_the_modules_register_what_they_define(plugin):
    every_other, pixart_alpha = plugin
    assert "every_other" in stepcaches.names() and "tiny_pixart_alpha" in models.names()
    adapter = models.build({"name": "tiny_pixart_alpha", "height": 16, "width": 16, "num_layers": 2, "text_dim": 24})
    assert family_of(adapter.transformer) is pixart_alpha.PIXART_ALPHA
    assert stepcaches.build({"name": "every_other"}).name == "every_other"
    # the offline stock pipelines (catlab.testing) build a PixArt-alpha pipeline; no family or step cache names it
    testing = ROOT / "catlab" / "testing"
    catlab_files = [p for p in (ROOT / "catlab").rglob("*.py") if testing not in p.parents]
    catlab_files += [*(ROOT / "conf").rglob("*.yaml")]
    assert not [p for p in catlab_files if "pixart_alpha" in p.read_text() or "every_other" in p.read_text()]


@torch.no_grad()
def test_the_new_family_prunes_as_the_stock_model_at_alpha_one(plugin):
    adapter = models.build({"name": "tiny_pixart_alpha", "height": 16, "width": 16, "num_layers": 2, "text_dim": 24})
    cond = adapter.encode(PROMPTS, guidance=True)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    stock = adapter.predict(x, torch.tensor(500.0), cond)
    pruner = TokenPruner(adapter.transformer).attach()
    assert len(pruner.processors) == 2
    adapter.predict(x, torch.tensor(500.0), cond)  # a full step fills the caches
    pruner.set_indices(torch.arange(pruner.num_tokens).flip(0).expand(2, -1), rows=4)  # every token, reordered
    torch.testing.assert_close(adapter.predict(x, torch.tensor(500.0), cond), stock, atol=1e-5, rtol=0)
    pruner.detach()
    assert_macs_match_the_flop_counter(adapter, x, cond, 0.25)


def _compose(tmp_path, *overrides):
    from hydra import compose, initialize_config_dir

    conf = tmp_path / "route_plugin" / "conf"
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(
            config_name="config",
            overrides=[f"hydra.searchpath=[file://{conf}]", "logger=local", "sampler.progress=false", *overrides],
        )


def test_both_run_from_their_yaml(plugin, tmp_path):
    """The plugin's YAML composes with catlab's; a run generates with the new family and the new cache."""
    from catlab.run import run as run_in

    def run(cfg, folder):
        folder.mkdir()
        return run_in(cfg, folder)

    base = ("model=tiny_pixart_alpha", "selector=full", "sampler.num_steps=4", "num_images=1", "save_images=false")
    full = run(_compose(tmp_path, *base), tmp_path / "full")
    cached = run(_compose(tmp_path, *base, "stepcache=every_other"), tmp_path / "cached")
    assert (cached["model"], cached["stepcache"]) == ("tiny_pixart_alpha", "every_other")
    # steps 1, 2 and 3 run the transformer; step 4 reuses step 3's output
    assert cached["macs_per_image"] == pytest.approx(full["macs_per_image"] * 3 / 4, rel=1e-6)


@pytest.mark.slow
def test_a_plugin_package_reaches_the_command_line(tmp_path):
    """The same files, declared as a package's entry points (as ``pip install`` would write them), reach
    ``python -m catlab.run`` in a fresh process."""
    write_plugin(tmp_path)
    info = tmp_path / "route_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: route-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[catlab.plugins]\nevery_other = route_plugin.every_other\npixart_alpha = route_plugin.pixart_alpha\n\n"
        "[catlab.conf]\nroute_plugin = route_plugin.conf\n"
    )
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "catlab.run", f"hydra.run.dir={run_dir}", "model=tiny_pixart_alpha"]
    cmd += ["selector=full", "stepcache=every_other", "sampler.num_steps=6", "logger=local", "num_images=1"]
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", "WANDB_MODE": "offline"}
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (metrics["model"], metrics["stepcache"]) == ("tiny_pixart_alpha", "every_other")
