"""``stepcache=sea_cache``: diffusers' SeaCache on the Wan family. It really gates (the scheduler's sigma reaches its
context: skipped steps run no block, the MAC counter sees it), threshold 0 is the full model, catlab's loop equals
diffusers' own SeaCache on its own WanPipeline and ``enable_pruning`` on that pipeline, diffusers' silent
full-model fallback is refused, and unsupported models are refused in one line."""

from __future__ import annotations

import pytest
import torch

from catlab import disable_pruning, enable_pruning, pruning_macs
from catlab.assembly import CompositionError, PruningSession
from catlab.registry import models, selectors
from catlab.sampler import SamplerConfig, StepReuse, sample
from catlab.stepcache import SeaCache, StepCacheError, stepcaches
from tests.conftest import FAST, generate, run_cli, tiny_pixart, tiny_sd3

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 8
PROMPTS, SEEDS = ["a red square"], [0]
LENIENT = {"name": "sea_cache", "threshold": 10.0}  # every step the gate may skip is skipped


def _sea(**kw) -> SeaCache:
    return stepcaches.build({"name": "sea_cache", **kw})


@pytest.fixture(scope="module")
def wan():
    torch.manual_seed(0)
    model = models.build({"name": "tiny_wan"})
    return model, generate(model, selectors.build("full"), PROMPTS, SEEDS, num_steps=STEPS)


def _forward(adapter):
    cond = adapter.encode(PROMPTS, True)
    x = torch.cat([adapter.initial_latents(SEEDS)] * 2)
    with torch.no_grad():
        return adapter.predict(x, torch.tensor(500.0), cond)


def _skipped(result, full) -> list[int]:
    """The 1-based steps that ran no block: a few percent of a full step (patch embedding, time embedding and
    output projection still run, and are counted)."""
    return [i + 1 for i, m in enumerate(result.step_macs) if m < 0.05 * full.full_step_macs]


def test_threshold_zero_computes_every_step_and_is_the_full_model(wan):
    model, full = wan
    result = generate(model, selectors.build("full"), PROMPTS, SEEDS, num_steps=STEPS, step_cache=_sea(threshold=0.0))
    assert result.step_macs == [full.full_step_macs] * STEPS
    torch.testing.assert_close(result.latents, full.latents, atol=1e-5, rtol=0)


def test_a_lenient_threshold_skips_steps_and_counts_only_what_ran(wan):
    """Step 1 (retention) and step 8 (cache end) compute; at most 2 skipped steps in a row; a skipped step's MACs
    are the embeddings' and the output projection's only, the same at every skipped step."""
    model, full = wan
    result = generate(model, selectors.build("full"), PROMPTS, SEEDS, num_steps=STEPS, step_cache=_sea(threshold=10.0))
    skipped = _skipped(result, full)
    assert skipped and 1 not in skipped and STEPS not in skipped
    assert not any(s + 1 in skipped and s + 2 in skipped for s in skipped)  # max_consecutive_cached=2
    computed = [m for i, m in enumerate(result.step_macs) if i + 1 not in skipped]
    assert computed == [full.full_step_macs] * len(computed)
    assert len({result.step_macs[s - 1] for s in skipped}) == 1 and result.step_macs[skipped[0] - 1] > 0
    assert result.macs < full.macs - len(skipped) * 0.9 * full.full_step_macs
    assert torch.isfinite(result.images).all() and not torch.allclose(result.latents, full.latents, atol=1e-4)


def test_max_consecutive_and_retention_are_diffusers_knobs(wan):
    model, full = wan
    run = lambda **kw: _skipped(  # noqa: E731
        generate(model, selectors.build("full"), PROMPTS, SEEDS, num_steps=STEPS, step_cache=_sea(**kw)), full
    )
    assert run(threshold=10.0, max_consecutive_cached=1) == [2, 4, 6]  # every other step, the last one computed
    assert run(threshold=10.0, max_consecutive_cached=1, retention_steps=4, cache_end_steps=2) == [5]


def test_remove_gives_back_the_stock_transformer(wan):
    model, _ = wan
    before = _forward(model)
    cache = _sea(threshold=10.0).apply(model.transformer)
    assert any(hasattr(m, "_diffusers_hook") and m._diffusers_hook.hooks for m in model.transformer.modules())
    cache.remove()
    assert not any(hasattr(m, "_diffusers_hook") and m._diffusers_hook.hooks for m in model.transformer.modules())
    assert torch.equal(_forward(model), before)


def test_diffusers_silent_full_model_fallback_is_refused(wan):
    """diffusers runs a call in full and logs it once when the context lacks the sigma, when there is no context,
    or when steps are not adjacent: each is a StepCacheError here."""
    model, _ = wan
    cache = _sea(threshold=10.0).apply(model.transformer)
    try:
        cache.begin(2)
        with pytest.raises(StepCacheError, match="needs the scheduler's sigma of step 1"):
            with cache.context(1, STEPS):
                pass
        with pytest.raises(StepCacheError, match=r"needs a sigma in \[0, 1\]"):
            with cache.context(1, STEPS, sigma=14.6):
                pass
        with pytest.raises(StepCacheError, match="requires a cache context"):
            _forward(model)
        with cache.context(1, STEPS, sigma=0.9):
            _forward(model)
        with pytest.raises(StepCacheError, match="non-adjacent scheduler steps"):
            with cache.context(3, STEPS, sigma=0.5):
                _forward(model)
    finally:
        cache.remove()


@pytest.mark.parametrize("family", ["sd3", "pixart", "flux", "wan_i2v"])
def test_models_without_diffusers_adapter_are_refused_in_one_line(family):
    from diffusers import WanTransformer3DModel

    transformer = {
        "sd3": lambda: tiny_sd3().transformer,
        "pixart": lambda: tiny_pixart().transformer,
        "flux": lambda: models.build({"name": "tiny_flux"}).transformer,
        "wan_i2v": lambda: WanTransformer3DModel(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=8,
            out_channels=4,
            text_dim=16,
            freq_dim=16,
            ffn_dim=16,
            num_layers=1,
        ),  # fmt: skip
    }[family]()
    with pytest.raises(StepCacheError, match="diffusers' SeaCache supports Wan text to video") as err:
        _sea().apply(transformer)
    assert "\n" not in str(err.value) and type(transformer).__name__ in str(err.value)
    assert not any(hasattr(m, "_diffusers_hook") and m._diffusers_hook.hooks for m in transformer.modules())


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("threshold", -0.1, "threshold must be non-negative"),
        ("residual_order", 2, "residual_order must be 0 or 1"),
        ("max_consecutive_cached", -1, "max_consecutive_cached must be a non-negative integer"),
        ("power_exp", 0.0, "power_exp must be positive"),
    ],
)
def test_bad_values_fail_when_built_in_one_line(key, value, message):
    with pytest.raises(ValueError, match=message) as err:
        _sea(**{key: value})
    assert str(err.value).startswith("sea_cache: ") and "\n" not in str(err.value)


def test_it_does_not_compose_with_token_pruning(wan):
    model, _ = wan
    policy = selectors.build({"name": "random", "alpha": 0.5})
    with pytest.raises(CompositionError, match="sea_cache"):
        PruningSession(model.transformer, policy, StepReuse(step_cache=_sea()))


# -- a stock WanPipeline: diffusers' own SeaCache, catlab's loop, enable_pruning -----------------------------------

PIPE_STEPS, SIZE, FRAMES, TEXT = 6, 32, 5, 16
TWO = ["a red circle", "a blue square"], [0, 1]


@pytest.fixture(scope="module")
def saved():
    """The checkpoint adapter (``model=wan2_1_t2v``) around the tiny WanPipeline, held in memory."""
    from catlab.testing.tiny_wan import checkpoint_adapter

    return checkpoint_adapter(SIZE, SIZE, FRAMES, TEXT)


def _pipe(adapter):
    from catlab.testing.tiny_wan import stock_pipeline

    return stock_pipeline(adapter)


def _call(pipe, adapter, guidance=1.0):
    with torch.no_grad():
        embeds = adapter.encode(TWO[0], guidance > 1).kwargs["encoder_hidden_states"]
    negative = dict(negative_prompt_embeds=embeds[:2]) if guidance > 1 else {}
    return pipe(
        prompt_embeds=embeds[-2:], **negative, height=SIZE, width=SIZE, num_frames=FRAMES,
        num_inference_steps=PIPE_STEPS, guidance_scale=guidance, latents=adapter.initial_latents(TWO[1]),
        output_type="latent",
    ).frames  # fmt: skip


def test_catlabs_loop_and_enable_pruning_equal_diffusers_own_seacache_on_its_pipeline(saved):
    """One branch per call (guidance 1): diffusers' WanPipeline with ``enable_cache(SeaCacheConfig(...))`` (it passes
    the step, the sigma and the step count itself), catlab's loop, and ``enable_pruning`` with ``sea_cache`` give the
    same latents; catlab's two skip the same steps; ``disable_pruning`` gives the stock pipeline back."""
    from diffusers import SeaCacheConfig

    pipe = _pipe(saved)
    stock = _call(pipe, saved)
    pipe.transformer.enable_cache(SeaCacheConfig(threshold=10.0))
    own = _call(pipe, saved)
    pipe.transformer.disable_cache()
    cfg = SamplerConfig(num_steps=PIPE_STEPS, guidance_scale=1.0, progress=False, count_macs=True)
    ran = sample(saved, selectors.build("full"), *TWO, cfg, StepReuse(step_cache=stepcaches.build(LENIENT)))
    enable_pruning(pipe, selectors.build("full"), reuse=StepReuse(step_cache=stepcaches.build(LENIENT)))
    pruned = _call(pipe, saved)
    macs = pruning_macs(pipe)
    disable_pruning(pipe)
    torch.testing.assert_close(ran.latents, own, atol=1e-5, rtol=0)
    assert torch.equal(pruned, ran.latents) and macs == [s.macs for s in ran.trace.steps]
    assert min(macs) < 0.1 * max(macs) and not torch.allclose(pruned, stock, atol=1e-4)
    assert torch.equal(_call(pipe, saved), stock)


def test_on_the_pipeline_with_guidance_both_calls_are_gated(saved):
    """Wan's pipeline calls the transformer twice per step with guidance; the negative prompt's call has its own
    SeaCache state and is skipped at the same steps (its MACs counted in its step)."""
    pipe = _pipe(saved)
    enable_pruning(pipe, selectors.build("full"), reuse=StepReuse(step_cache=stepcaches.build(LENIENT)))
    out = _call(pipe, saved, guidance=5.0)
    macs = pruning_macs(pipe)
    disable_pruning(pipe)
    full = max(macs)
    assert macs[0] == macs[-1] == full and min(macs) < 0.1 * full and torch.isfinite(out).all()


# -- the CLI and the embedded video model --------------------------------------------------------------------------


def test_cli_runs_sea_cache_on_tiny_wan(tmp_path):
    import json

    _, run_dir = run_cli(
        "model=tiny_wan", "selector=full", "stepcache=sea_cache", "stepcache.threshold=1.0", "num_images=1",
        *FAST, tmp_path=tmp_path,
    )  # fmt: skip
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["stepcache"] == "sea_cache" and metrics["macs_ratio"] > 1.3


@pytest.mark.slow
def test_cli_refuses_an_unsupported_model_in_one_line(tmp_path):
    proc, run_dir = run_cli(
        "model=tiny_sd3", "model.num_layers=2", "selector=full", "stepcache=sea_cache", *FAST,
        tmp_path=tmp_path, check=False,
    )  # fmt: skip
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "step cache error: sea_cache cannot run on a SD3Transformer2DModel" in proc.stderr + proc.stdout


@pytest.mark.slow
def test_the_embedded_video_model_skips_steps_with_the_default_threshold():
    model = models.build({"name": "embedded_video"})
    prompts, seeds = ["a red circle moving right"], [0]
    full = generate(model, selectors.build("full"), prompts, seeds, num_steps=10)
    zero = generate(model, selectors.build("full"), prompts, seeds, num_steps=10, step_cache=_sea(threshold=0.0))
    cached = generate(model, selectors.build("full"), prompts, seeds, num_steps=10, step_cache=_sea())
    torch.testing.assert_close(zero.latents, full.latents, atol=1e-5, rtol=0)
    assert _skipped(cached, full) and cached.macs < full.macs


def test_on_a_bare_transformer_without_a_scheduler_it_stops_at_the_first_call(saved):
    """``enable_pruning`` on the transformer alone knows no scheduler, so no sigma: a clear error, not a full run."""
    transformer = saved.pipeline.transformer
    enable_pruning(transformer, selectors.build("full"), reuse=StepReuse(step_cache=stepcaches.build(LENIENT)))
    x = torch.randn(1, transformer.config.in_channels, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, TEXT, transformer.config.text_dim, generator=torch.Generator().manual_seed(1))
    try:
        with pytest.raises(StepCacheError, match="a bare transformer has no scheduler"), torch.no_grad():
            transformer(hidden_states=x, timestep=torch.tensor([900.0]), encoder_hidden_states=text)
    finally:
        disable_pruning(transformer)
    assert not any(hasattr(m, "_diffusers_hook") and m._diffusers_hook.hooks for m in transformer.modules())
