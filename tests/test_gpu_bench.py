"""The wall-clock benchmark runs end to end at tiny shapes on a CPU, graphed mode on the CPU stand-in."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from argparse import Namespace

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
        rows = bench.main(
            [
                "--device",
                "cpu",
                "--tiny",
                "--steps",
                "12",
                "--start-step",
                "8",
                "--repeats",
                "1",
                "--graphs",
                "--batch",
                "1,2",
                "--json",
                str(out_file),
            ]
        )
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
    rows = bench.main(
        [
            "--device",
            "cpu",
            "--tiny",
            "--models",
            "sd3",
            "--steps",
            "10",
            "--start-step",
            "8",
            "--repeats",
            "1",
            "--graphs",
            "--strategies",
            "cat",
        ]
    )
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
    args = [
        "--device",
        "cpu",
        "--tiny",
        "--models",
        "sd3",
        "--steps",
        "14",
        "--start-step",
        "8",
        "--repeats",
        "1",
        "--graphs",
        "--strategies",
        "cat,sequential",
        "--jsonl",
        str(tmp_path / "rows.jsonl"),
    ]
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
    cmd = [
        sys.executable,
        str(ROOT / "experiments" / "gpu_bench.py"),
        "--device",
        "cpu",
        "--tiny",
        "--steps",
        "12",
        "--start-step",
        "8",
        "--repeats",
        "1",
        "--jsonl",
        str(out),
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )
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
    # the kill lands wherever the bench is: tiny rows come fast, so more than two may be out by then;
    # each one must be whole, in the order the bench measures them
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) >= 2 and all(r["full_s"] > 0 and r["pruned_s"] > 0 for r in rows)
    assert [(r["model"], r["strategy"]) for r in rows[:2]] == [("sd3", "cat"), ("sd3", "sequential")]


# -- experiments/gpu_check.sh and its pre-flight ---------------------------------------------------
def _plain_env(**extra) -> dict:
    """The environment of a plain checkout: the checkout on PYTHONPATH, this Python first on PATH, nothing else."""
    path = f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PATH": path,
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
        **extra,
    }


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the no-CUDA answer needs a machine without CUDA")
def test_gpu_check_without_cuda_exits_2_with_one_line(tmp_path):
    proc = subprocess.run(
        ["bash", str(ROOT / "experiments" / "gpu_check.sh"), str(tmp_path / "out")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=_plain_env(),
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and "no CUDA device" in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing half-made


def test_preflight_passes_from_a_plain_checkout_and_names_what_is_missing(tmp_path, monkeypatch):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "gpu_preflight.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=_plain_env(),
        timeout=60,
    )
    assert proc.returncode == 0 and "every module the checks import is here" in proc.stdout, proc.stderr

    spec = importlib.util.spec_from_file_location("gpu_preflight", ROOT / "experiments" / "gpu_preflight.py")
    preflight = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(preflight)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in ("diffusers", "sklearn") else find_spec(name, *a)
    )
    monkeypatch.setattr(preflight, "_installed", lambda dist: dist != "antlr4-python3-runtime")
    problems = preflight.missing()
    assert any(
        p.startswith("diffusers: not installed (imported by ") and "pip download it into .whl/" in p for p in problems
    )
    assert any(p.startswith("sklearn: not installed (imported by catlab/selection/clustering.py)") for p in problems)
    assert any(p.startswith("antlr4-python3-runtime: not installed (required by hydra)") for p in problems)


@pytest.mark.slow
def test_gpu_check_dry_run_on_a_cpu_writes_every_part_and_prints_the_summary_last(tmp_path):
    """The script's own flow, on a CPU with tiny shapes: parts logged, rows as JSON lines, the summary last."""
    out = tmp_path / "out"
    env = _plain_env(GPU_CHECK_ALLOW_CPU="1", GPU_CHECK_BENCH_ARGS="--device cpu --tiny --start-step 8")
    proc = subprocess.run(
        ["bash", str(ROOT / "experiments" / "gpu_check.sh"), "--quick", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    parts = [line.split("\t") for line in (out / "parts.tsv").read_text().splitlines()[1:]]
    assert [(p[0], p[1]) for p in parts] == [("cuda_tests", "passed"), ("bench_28", "passed")]
    assert "skipped" in (out / "cuda_tests.log").read_text() and (out / "cuda_tests.xml").exists()  # the whole log
    rows = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]
    assert {(r["model"], r["steps"], r["batch"]) for r in rows} == {("sd3", 28, 1), ("pixart", 28, 1)}
    assert all(r["mode"] == "eager" or "refusals" in r for r in rows)
    summary = (out / "summary.md").read_text()
    assert proc.stdout.rstrip().endswith(summary.rstrip())  # printed last
    assert "| bench_28 | passed |" in summary and "| SD3-medium | graphed (ran eager) | 1 | 28 | cat |" in summary


def test_gpu_bench_flux_rows_on_a_cpu(capsys, monkeypatch):
    bench = _bench(monkeypatch)
    with emulate_on_cpu():
        rows = bench.main(
            [
                "--device",
                "cpu",
                "--tiny",
                "--family",
                "flux",
                "--steps",
                "12",
                "--start-step",
                "8",
                "--repeats",
                "1",
                "--graphs",
                "--strategies",
                "cat,taylorseer",
            ]
        )
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
        19,
        38,
        3072,
    )
    assert (cfg["sample_size"] // 2) ** 2 == 4096 and text == 512 and cfg["guidance_embeds"]


def test_gpu_bench_macs_only_at_full_size_builds_nothing_real(capsys, monkeypatch):
    bench = _bench(monkeypatch)
    rows = bench.main(["--macs-only", "--family", "flux,sd3", "--steps", "28"])
    flux, sd3 = rows
    assert (flux["tokens"], flux["text_tokens"], flux["rows"], flux["kept"]) == (4096, 512, 1, 1228)
    assert sd3["rows"] == 2  # CFG rows; FLUX runs one branch
    # FLUX.1-dev: ~12B weights over 4608 tokens plus attention: tens of TMACs per step
    assert 3e13 < flux["full_step_macs"] < 4.5e13 and flux["pruned_step_macs"] < flux["full_step_macs"] / 2
    assert flux["macs_ratio"] == 28 * flux["full_step_macs"] / (
        8 * flux["full_step_macs"] + 20 * flux["pruned_step_macs"]
    )
