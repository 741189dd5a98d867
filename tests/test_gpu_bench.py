"""The wall-clock benchmark runs end to end at tiny shapes on a CPU, graphed mode on the CPU stand-in."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

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


def test_a_refused_selection_graph_labels_the_row_eager(capsys, monkeypatch, tmp_path):
    """cat's forwards replay, but its selection graph is refused (a select_tensors that rebinds its state):
    the row says it ran eagerly, and why, in the printed table and in the JSON line written for it."""
    from catlab.selection.cat import Cat

    select_tensors = Cat.select_tensors

    def rebinding(self, state):
        out = select_tensors(self, state)
        self.counted = self.counted.clone()  # a new tensor each step: a replay would read the old one
        return out

    bench = _bench(monkeypatch)
    args = ["--device", "cpu", "--tiny", "--models", "sd3", "--steps", "14", "--start-step", "8", "--repeats", "1",
            "--graphs", "--strategies", "cat,sequential", "--jsonl", str(tmp_path / "rows.jsonl")]
    with emulate_on_cpu():
        clean = {r["strategy"]: r for r in bench.main(args) if r["mode"].startswith("graphed")}
        monkeypatch.setattr(Cat, "select_tensors", rebinding)
        refused = {r["strategy"]: r for r in bench.main(args) if r["mode"].startswith("graphed")}
    assert clean["cat"]["mode"] == "graphed" and clean["cat"]["selection_replays"] > 0 and not clean["cat"]["refusals"]
    assert clean["cat"]["forward_replays"] > 0 and clean["cat"]["forward_captures"] == 0  # captured in the warm-up
    assert refused["cat"]["mode"] == "graphed (ran eager)" and refused["cat"]["selection_replays"] == 0
    assert "select_tensors rebinds counted" in refused["cat"]["refusals"][0]
    assert refused["sequential"]["mode"] == "graphed"  # its own row is unaffected
    lines = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert len(lines) == 8 and lines[-2] == json.loads(json.dumps(refused["cat"]))  # eager + graphed, 2 runs


@pytest.mark.slow
def test_a_bench_killed_mid_way_leaves_its_finished_rows(tmp_path):
    """Run as a script from the checkout (only PYTHONPATH set, another working directory), killed once two
    rows are out: those rows are in the JSON-lines file, whole."""
    out = tmp_path / "rows.jsonl"
    cmd = [sys.executable, str(ROOT / "experiments" / "gpu_bench.py"), "--device", "cpu", "--tiny", "--steps", "12",
           "--start-step", "8", "--repeats", "1", "--jsonl", str(out)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and len(out.read_text().splitlines()) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, f"the bench ended before it was killed: {proc.stderr.read()[-2000:]}"
        proc.kill()
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) >= 2 and all(r["model"] == "sd3" and r["full_s"] > 0 for r in rows)
    assert [r["strategy"] for r in rows[:2]] == ["cat", "sequential"]
