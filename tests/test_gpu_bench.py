"""The wall-clock benchmark runs end to end at tiny shapes on a CPU, graphed mode on the CPU stand-in."""
from __future__ import annotations

import importlib.util
import json
import sys
from argparse import Namespace

from catlab.pruning.capture import emulate_on_cpu
from tests.conftest import ROOT


def _bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "experiments" / "gpu_bench.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_bench", bench)  # its dataclass looks itself up there
    spec.loader.exec_module(bench)
    return bench


def test_gpu_bench_tiny_on_cpu(capsys, monkeypatch, tmp_path):
    bench = _bench(monkeypatch)
    out_file = tmp_path / "rows.json"
    with emulate_on_cpu():
        rows = bench.main(["--device", "cpu", "--tiny", "--steps", "12", "--start-step", "8", "--repeats", "1",
                           "--graphs", "--batch", "1,2", "--json", str(out_file)])
    out = capsys.readouterr().out
    assert "speed-up" in out and "| SD3-medium | graphed | 1 | 12 | cat |" in out
    assert "not in the graphed modes: taylorseer" in out and "not in the compiled modes" not in out
    seen = {(r["model"], r["mode"], r["batch"], r["strategy"]) for r in rows}
    for model in ("sd3", "pixart"):
        assert {(model, "eager", 1, s) for s in ("cat", "sequential", "taylorseer", "schedule")} <= seen
        assert {(model, "graphed", 1, s) for s in ("cat", "sequential", "schedule")} <= seen
        assert (model, "graphed", 1, "taylorseer") not in seen
        assert {(model, "eager", 2, "cat"), (model, "graphed", 2, "cat")} <= seen
    for r in rows:
        assert r["full_s"] > 0 and r["pruned_s"] > 0 and 0 <= r["selection"] < 1
        assert 1.1 < r["macs_ratio"] < 2.5  # 4 of 12 steps prune or skip; fixed costs are large at tiny shapes
    assert json.loads(out_file.read_text())["rows"] == json.loads(json.dumps(rows))


def test_gpu_bench_graphed_mode_on_a_cpu_says_it_ran_eager(capsys, monkeypatch):
    bench = _bench(monkeypatch)
    rows = bench.main(["--device", "cpu", "--tiny", "--models", "sd3", "--steps", "10", "--start-step", "8",
                       "--repeats", "1", "--graphs", "--strategies", "cat"])
    assert [r["mode"] for r in rows] == ["eager", "graphed (ran eager)"]


def test_gpu_bench_counts_host_operators_and_graphs_cut_them(capsys, monkeypatch):
    bench = _bench(monkeypatch)
    rows = bench.main(["--device", "cpu", "--count-ops", "--models", "sd3", "--steps", "12", "--start-step", "8"])
    ops = {(r["strategy"], r["mode"]): r["ops"] for r in rows}
    assert rows[0]["layers"] == 24  # SD3-medium's depth: the operator graph of the full model
    for name in ("full", "cat"):
        assert ops[(name, "graphed")] * 10 < ops[(name, "eager")], ops  # one replay instead of ~1,300 per step
    assert ops[("cat", "eager")] > ops[("full", "eager")]  # gather, scatter, cache writes and the selection


def test_gpu_bench_flux_rows_on_a_cpu(capsys, monkeypatch):
    bench = _bench(monkeypatch)
    with emulate_on_cpu():
        rows = bench.main(["--device", "cpu", "--tiny", "--family", "flux", "--steps", "12", "--start-step", "8",
                           "--repeats", "1", "--graphs", "--strategies", "cat,taylorseer"])
    out = capsys.readouterr().out
    assert "| FLUX.1-dev | graphed | 1 | 12 | cat |" in out and "(FLUX: its guidance input, one branch)" in out
    seen = {(r["mode"], r["strategy"]): r for r in rows}
    assert set(seen) == {("eager", "cat"), ("eager", "taylorseer"), ("graphed", "cat")}
    assert seen[("eager", "cat")]["macs_ratio"] == seen[("graphed", "cat")]["macs_ratio"] > 1.1
    assert seen[("eager", "taylorseer")]["macs_ratio"] > 1.0
    t = bench.build("flux", Namespace(tiny=True, device="cpu", dtype="float32")).transformer
    assert len(t.transformer_blocks) == 1 and len(t.single_transformer_blocks) == 2  # 1:2, as FLUX.1-dev's 19:38



def test_gpu_bench_full_flux_shape_is_flux_dev(monkeypatch):
    bench = _bench(monkeypatch)
    cls, cfg, text, text_dim, pooled = bench.FULL_SIZE["flux"]
    assert (cfg["num_layers"], cfg["num_single_layers"], cfg["num_attention_heads"] * cfg["attention_head_dim"]) == (
        19, 38, 3072)
    assert (cfg["sample_size"] // 2) ** 2 == 4096 and text == 512 and cfg["guidance_embeds"]


def test_gpu_bench_macs_only_at_full_size_builds_nothing_real(capsys, monkeypatch):
    bench = _bench(monkeypatch)
    rows = bench.main(["--macs-only", "--family", "flux,sd3", "--steps", "28"])
    flux, sd3 = rows
    assert (flux["tokens"], flux["text_tokens"], flux["rows"], flux["kept"]) == (4096, 512, 1, 1228)
    assert sd3["rows"] == 2  # CFG rows; FLUX runs one branch
    # FLUX.1-dev: ~12B weights over 4608 tokens plus attention: tens of TMACs per step
    assert 3e13 < flux["full_step_macs"] < 4.5e13 and flux["pruned_step_macs"] < flux["full_step_macs"] / 2
    assert flux["macs_ratio"] == 28 * flux["full_step_macs"] / (8 * flux["full_step_macs"] + 20 * flux["pruned_step_macs"])
