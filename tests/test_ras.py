"""``ras`` against index sets recorded from the authors' RAS code, and in both of catlab's loops.

``tests/golden/ras_reference.json`` holds, per case and seed, the token set the authors'
``RASFlowMatchEulerDiscreteScheduler.step`` (microsoft/RAS, driven by their ``ras_manager``,
on a CPU) chose to recompute at each of 28 steps (a hex bit mask, ``null`` at a full step), fed
the outputs of ``tests/golden/ras_inputs.py``; and their drop-count schedules
(``generate_skip_token_list``). The recorder checked that their dropped tokens keep the previous
step's output, which is catlab's output cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import catlab  # noqa: F401  (registers the selectors)
from catlab.registry import selectors
from catlab.sampler import SamplerConfig, StepReuse, sample
from catlab.selection.base import StepState
from tests.conftest import tiny_sd3
from tests.golden.ras_inputs import NUM_STEPS, make_fresh

GOLDEN = json.loads((Path(__file__).resolve().parent / "golden" / "ras_reference.json").read_text())


def _mask(hexed: str, n: int) -> torch.Tensor:
    bits = bin(int(hexed, 16))[2:].zfill(n)
    return torch.tensor([b == "1" for b in bits])


def _drive(policy, fresh: torch.Tensor, grid: int):
    """catlab's loop on fixed outputs: the kept mask per step (None: full), dropped tokens keep their output."""
    b, n = fresh.shape[1], grid * grid
    policy.reset(b, (grid, grid), NUM_STEPS, torch.device("cpu"))
    out, masks = None, []
    for step in range(1, NUM_STEPS + 1):
        k = policy.num_kept(step, n)
        if k is None:
            out, _ = fresh[step - 1].clone(), masks.append(None)
            continue
        state = StepState(step=step, num_steps=NUM_STEPS, grid=(grid, grid), batch_size=b, k=k, output=out)
        idx = policy.select(state)
        assert idx.shape == (b, k) and all(len(set(r.tolist())) == k for r in idx)
        mask = torch.zeros(b, n, dtype=torch.bool).scatter_(1, idx, True)
        masks.append(mask)
        out = torch.where(mask[..., None], fresh[step - 1], out)
    return masks


def _cases(prefix):
    return [v for k, v in GOLDEN["cases"].items() if k.startswith(prefix)]


@pytest.mark.parametrize("name", ["hr025", "hr1", "hr05", "l2norm"])
def test_ras_recomputes_the_authors_tokens(name):
    cases = _cases(name + "_")
    c = cases[0]
    grid, n = c["grid"], c["grid"] ** 2
    fresh = torch.cat([make_fresh(case["seed"], grid) for case in cases], dim=1)  # the seeds as one batch
    end = None if c["end"] >= NUM_STEPS else c["end"]  # their last RAS step (0-based) repeats the one before
    policy = selectors.build(
        {
            "name": "ras",
            "alpha": c["alpha"],
            "high_ratio": c["high_ratio"],
            "starvation_scale": c["starvation_scale"],
            "metric": c["metric"],
            "end_step": end,
        }
    )
    masks = _drive(policy, fresh, grid)
    for step, mask in enumerate(masks, start=1):
        for row, case in enumerate(cases):
            theirs = case["kept"][step - 1]
            if end is not None and step == end + 1:  # their off-by-one at the end step: the previous set, stale
                assert theirs == case["kept"][step - 2] and mask is None
                continue
            assert (mask is None) == (theirs is None), (name, step)
            if mask is not None:
                assert torch.equal(mask[row], _mask(theirs, n)), (name, case["seed"], step)


def test_ras_drops_the_whole_budget_where_the_authors_drop_one_token_fewer():
    """high_ratio=0.3 of 32 dropped: the authors' two round-downs drop 22 + 9 = 31; catlab drops 23 + 9 = 32
    (k = ⌊α·N⌋). At the first pruned step their kept set is catlab's plus one token."""
    for case in _cases("hr03_"):
        grid, n = case["grid"], case["grid"] ** 2
        policy = selectors.build({"name": "ras", "alpha": 0.5, "high_ratio": 0.3})
        masks = _drive(policy, make_fresh(case["seed"], grid), grid)
        first = 4  # step 5, the first pruned one
        theirs = _mask(case["kept"][first], n)
        ours = masks[first][0]
        assert int(theirs.sum()) == n // 2 + 1 and int(ours.sum()) == n // 2
        assert bool((ours <= theirs).all())


@pytest.mark.parametrize("key", list(GOLDEN["schedules"]))
def test_dynamic_drop_schedule_matches_the_authors(key):
    s = GOLDEN["schedules"][key]
    n = s["grid"] ** 2
    policy = selectors.build(
        {"name": "ras", "alpha": s["alpha"], "drop_step": s["drop_step"], "drop_step_length": s["drop_step_length"]}
    )
    policy.reset(1, (s["grid"], s["grid"]), NUM_STEPS, torch.device("cpu"))
    ours = [0 if (k := policy.num_kept(t, n)) is None else n - k for t in range(1, NUM_STEPS + 1)]
    assert ours == s["drop_counts"]


def test_static_schedule_keeps_floor_alpha_n_and_runs_resets_full():
    policy = selectors.build({"name": "ras", "alpha": 0.3})
    policy.reset(1, (10, 10), 28, torch.device("cpu"))
    plan = [policy.num_kept(t, 100) for t in range(1, 29)]
    assert plan[:4] == [None] * 4 and plan[12] is None and plan[20] is None  # warm-up, resets 13 and 21
    assert {k for k in plan if k is not None} == {30}


def test_starvation_boosts_tokens_left_out_often():
    """With high_ratio=0 the flattest tokens are left out; a large starvation scale brings them back."""
    grid, n = 4, 16
    out = torch.ones(1, n, 8)
    out[0, :8] += torch.randn(8, 8, generator=torch.Generator().manual_seed(0))  # tokens 8.. are flat (std 0)
    out[0, 8:] += 0.01 * torch.arange(8.0)[:, None] * torch.tensor([1.0, -1.0] * 4)
    for scale, expect_back in ((0.0, False), (1.0, True)):  # each drop multiplies a score by e^scale
        spec = {"name": "ras", "alpha": 0.5, "high_ratio": 0.0, "starvation_scale": scale, "patch_size": 1}
        p = selectors.build(spec)
        p.reset(1, (grid, grid), 28, torch.device("cpu"))
        sets = [set(p.select(StepState(t, 28, (grid, grid), 1, 8, out)).tolist()[0]) for t in range(5, 10)]
        assert sets[0] == set(range(8))
        assert any(later != sets[0] for later in sets[1:]) == expect_back


def test_bad_settings_name_the_key():
    for bad, word in (
        ({"metric": "var"}, "metric"),
        ({"high_ratio": 1.5}, "high_ratio"),
        ({"channel_layout": "x"}, "channel_layout"),
    ):
        with pytest.raises(ValueError, match=word):
            selectors.build({"name": "ras", **bad})


PROMPTS, SEEDS = ["a red circle", "a blue square"], [0, 1]


def test_alpha_one_is_the_full_model_and_alpha_half_saves_macs():
    adapter = tiny_sd3()
    cfg = SamplerConfig(num_steps=8, guidance_scale=4.0, progress=False)
    full = sample(adapter, selectors.build("full"), PROMPTS, SEEDS, cfg)
    same = sample(
        adapter,
        selectors.build({"name": "ras", "alpha": 1.0, "start_step": 2, "reset_steps": [5]}),
        PROMPTS,
        SEEDS,
        cfg,
    )
    torch.testing.assert_close(same.images, full.images, atol=1e-5, rtol=1e-5)
    half = sample(adapter, selectors.build({"name": "ras", "start_step": 2, "reset_steps": [5]}), PROMPTS, SEEDS, cfg)
    macs = lambda r: sum(s.macs for s in r.trace.steps)  # noqa: E731
    assert macs(half) < macs(full) and not torch.allclose(half.images, full.images, atol=1e-4)
    assert [s.kept for s in half.trace.steps] == [64, 64, 32, 32, 64, 32, 32, 32]


def test_stock_sd3_pipeline_equals_catlabs_loop():
    from catlab import disable_pruning, enable_pruning
    from tests.test_assembly_parity import SCALE, STEPS, _sd3

    spec = {"name": "ras", "start_step": 2, "reset_steps": [4]}
    adapter = tiny_sd3()
    cfg = SamplerConfig(num_steps=STEPS, guidance_scale=SCALE, progress=False)
    ran = sample(adapter, selectors.build(spec), PROMPTS, SEEDS, cfg, StepReuse())
    pipe, call = _sd3(adapter)
    enable_pruning(pipe, selectors.build(spec), guidance_scale=SCALE)
    latents = call()
    disable_pruning(pipe)
    torch.testing.assert_close(latents, ran.latents, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["embedded", "tiny_sd3", "tiny_flux"])
def test_ras_runs_from_the_command_line(tmp_path, model):
    from tests.conftest import FAST, run_cli

    layout = ["selector.channel_layout=channel_major"] if model == "tiny_flux" else []
    _, run_dir = run_cli(
        f"model={model}",
        "selector=ras",
        "num_images=1",
        "batch_size=1",
        "save_images=false",
        *layout,
        *FAST,
        tmp_path=tmp_path,
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["selector"] == "ras" and metrics["macs_ratio"] > 1
