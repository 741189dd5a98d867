"""``speca`` against step decisions recorded from the authors' SpeCa code, and in both of catlab's loops.

``tests/golden/speca_reference.json`` holds, per case, the kind of every step ("full",
"forecast" or "verify": a forecast step that measures its error) that the authors'
``cache_init`` + ``cal_type`` (Cache4Diffusion ``flux/speca-flux`` and ``dit/speca-dit``, run on a
CPU) chose when fed the listed verification errors, one per step (read at verifying steps only).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import catlab  # noqa: F401  (registers the selectors)
from catlab.registry import reuses, selectors
from catlab.sampler import SamplerConfig, StepReuse, sample
from tests.conftest import tiny_sd3

GOLDEN = json.loads((Path(__file__).resolve().parent / "golden" / "speca_reference.json").read_text())


@pytest.mark.parametrize("key", list(GOLDEN["cases"]))
def test_speca_decides_the_authors_steps(key):
    case = GOLDEN["cases"][key]
    n = case["num_steps"]
    fields = ("base_threshold", "decay_rate", "min_threshold", "min_taylor_steps", "max_taylor_steps")
    policy = selectors.build({"name": "speca", "alpha": 0.25, **{f: case[f] for f in fields}})
    policy.reset(1, (4, 4), n, torch.device("cpu"))
    kinds = []
    for step in range(1, n + 1):
        k = policy.num_kept(step, 16)
        kinds.append("full" if k is None else ("forecast" if k == 0 else "verify"))
        if kinds[-1] == "verify":
            assert k == 4
            policy.record_error(step, case["errors"][step - 1])
    assert kinds == case["kinds"]


def test_verification_error_is_the_forecasts_relative_l1_per_sample():
    policy = selectors.build({"name": "speca", "order": 1, "reduce": "any"})
    policy.reset(2, (2, 2), 10, torch.device("cpu"))
    y1, y2 = torch.ones(2, 4, 3), 2 * torch.ones(2, 4, 3)
    policy.observe(1, y1, None)
    policy.observe(2, y2, None)  # the order-1 forecast of step 3 is 3 everywhere
    computed = torch.full((2, 4, 3), 3.0)
    computed[1] = 4.0  # sample 1: |3 - 4| / 4 = 0.25
    policy.observe(3, computed, torch.tensor([[0, 2], [1, 3]]))
    assert policy.pending[0] == 3 and float(policy.pending[1]) == pytest.approx(0.25)
    policy = selectors.build({"name": "speca", "order": 1, "reduce": "mean"})
    policy.reset(2, (2, 2), 10, torch.device("cpu"))
    for step, y in ((1, y1), (2, y2)):
        policy.observe(step, y, None)
    policy.observe(3, computed, torch.tensor([[0, 2], [1, 3]]))
    assert float(policy.pending[1]) == pytest.approx(0.125)


def test_bad_settings_name_the_key():
    for bad, word in (
        ({"reduce": "max"}, "reduce"),
        ({"max_taylor_steps": -1}, "max_taylor_steps"),
        ({"order": 3}, "order"),
    ):
        with pytest.raises(ValueError, match=word):
            selectors.build({"name": "speca", **bad})


PROMPTS, SEEDS = ["a red circle", "a blue square"], [0, 1]


def test_no_forecast_is_the_full_model_and_speca_saves_macs():
    adapter = tiny_sd3()
    cfg = SamplerConfig(num_steps=10, guidance_scale=4.0, progress=False)
    full = sample(adapter, selectors.build("full"), PROMPTS, SEEDS, cfg)
    same = sample(
        adapter,
        selectors.build({"name": "speca", "max_taylor_steps": 0}),
        PROMPTS,
        SEEDS,
        cfg,
        StepReuse(rule=reuses.build({"name": "taylor", "order": 2})),
    )
    torch.testing.assert_close(same.images, full.images, atol=1e-5, rtol=1e-5)
    policy = selectors.build({"name": "speca", "alpha": 0.25})
    ran = sample(adapter, policy, PROMPTS, SEEDS, cfg, StepReuse(rule=reuses.build({"name": "taylor", "order": 2})))
    macs = lambda r: sum(s.macs for s in r.trace.steps)  # noqa: E731
    assert macs(ran) < macs(full)
    kinds = [policy.kinds[s] for s in range(1, 11)]
    assert kinds[:4] == ["full", "forecast", "full", "forecast"] and "verify" in kinds
    assert [s.kept for s in ran.trace.steps] == [{"full": 64, "forecast": 0, "verify": 16}[k] for k in kinds]
    # every verification but one at the last step (nothing left to decide) is read at the next decision
    assert set(policy.errors) == {s for s, k in enumerate(kinds[:-1], start=1) if k == "verify"}


def test_stock_sd3_pipeline_equals_catlabs_loop():
    from catlab import disable_pruning, enable_pruning
    from tests.test_assembly_parity import SCALE, STEPS, _sd3

    spec = {"name": "speca", "alpha": 0.25, "min_taylor_steps": 1, "start_step": 1}
    parts = lambda: StepReuse(rule=reuses.build({"name": "taylor", "order": 2}))  # noqa: E731
    adapter = tiny_sd3()
    cfg = SamplerConfig(num_steps=STEPS, guidance_scale=SCALE, progress=False)
    policy = selectors.build(spec)
    ran = sample(adapter, policy, PROMPTS, SEEDS, cfg, parts())
    pipe, call = _sd3(adapter)
    hooked = selectors.build(spec)
    enable_pruning(pipe, hooked, guidance_scale=SCALE, reuse=parts())
    latents = call()
    disable_pruning(pipe)
    assert hooked.kinds == policy.kinds and "verify" in policy.kinds.values()
    torch.testing.assert_close(latents, ran.latents, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["embedded", "tiny_sd3", "tiny_flux"])
def test_speca_runs_from_the_command_line(tmp_path, model):
    from tests.conftest import FAST, run_cli

    _, run_dir = run_cli(
        f"model={model}",
        "selector=speca",
        "reuse=taylor",
        "reuse.order=2",
        "num_images=1",
        "batch_size=1",
        "save_images=false",
        *FAST,
        tmp_path=tmp_path,
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["selector"] == "speca" and metrics["macs_ratio"] > 1
