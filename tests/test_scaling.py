"""Scale-out: sweeps on Hydra launchers, torchrun-sharded evaluation, and resumable results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli, run_python

TINY = (
    "model=tiny_sd3",
    "model.num_layers=1",
    "model.height=16",
    "model.width=16",
    "sampler.num_steps=4",
    "sampler.progress=false",
    "logger=local",
)
# batch_size=1: a stochastic selector's draws depend on a sample's place in its batch, so sharded and
# single-process runs agree image by image only when every batch holds one image
EVAL = (
    *TINY,
    "+strategy_defaults.start_step=2",
    "batch_size=1",
    "prompts.prompts=[a red circle,a blue square,a green star]",
    "metrics=[psnr,ssim]",
    "diagnostics=false",
    "save_images=false",
)


def _sweep(launcher: str, tmp_path: Path) -> list[dict]:
    run_cli(
        "-m",
        f"hydra/launcher={launcher}",
        "selector=full,random",
        "selector.start_step=2",
        *TINY,
        tmp_path=tmp_path,
        timeout=600,
    )
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir() and p.name.isdigit())
    return [json.loads((j / "metrics.json").read_text()) for j in jobs]


@pytest.mark.slow
def test_sweep_with_joblib_processes(tmp_path):
    metrics = _sweep("processes", tmp_path)
    assert [m["selector"] for m in metrics] == ["full", "random"]
    assert metrics[1]["macs_ratio"] > 1.2


@pytest.mark.slow
def test_sweep_with_submitit_local(tmp_path):
    metrics = _sweep("slurm_local", tmp_path)
    assert [m["selector"] for m in metrics] == ["full", "random"]


#: runs catlab.evaluate in a process that dies (as a killed job would) once it has written N records
KILLED_AFTER = """
import os, runpy, sys
from catlab.evaluation.store import ResultStore
left, put = int(sys.argv.pop(1)), ResultStore.put
def put_then_die(self, *args, **kwargs):
    global left
    put(self, *args, **kwargs)
    left -= 1
    if left == 0:
        os._exit(17)
ResultStore.put = put_then_die
runpy.run_module("catlab.evaluate", run_name="__main__", alter_sys=True)
"""


def _evaluate(out: Path, *extra: str, torchrun: int = 0, killed_after: int = 0, check: bool = True):
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun}", "--master_port=29611"]
        if torchrun
        else [sys.executable]
    )
    app = ["-c", KILLED_AFTER, str(killed_after)] if killed_after else ["-m", "catlab.evaluate"]
    cmd = [*launcher, *app, f"hydra.run.dir={out}", *EVAL, *extra]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "CATLAB_CACHE": str(out.parent / "cache")}
    if check and not torchrun and not killed_after:  # expected to succeed in this process: the shared interpreter
        proc = run_python(cmd, cwd=ROOT, env=full_env, timeout=600)
    else:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stdout[-3000:] + proc.stderr[-3000:])
    return proc


def _quality(out: Path) -> list[tuple]:
    rows = json.loads((out / "results.json").read_text())
    return [
        (r["method"], r["alpha"], r["num_images"], r["macs_per_image"], r["macs_ratio"], r.get("psnr"), r.get("ssim"))
        for r in rows
    ]


def _records(out: Path) -> dict[str, float]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in (out / "store").glob("*/p*.json")}


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory) -> Path:
    """One uninterrupted single-process evaluation, the baseline of the tests below."""
    out = tmp_path_factory.mktemp("clean") / "run"
    _evaluate(out)
    return out


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path, clean_run):
    _evaluate(tmp_path / "ddp", torchrun=2)
    assert _quality(tmp_path / "ddp") == _quality(clean_run)
    assert len(_records(tmp_path / "ddp")) == 6  # 2 strategies x 3 prompts, each written once


@pytest.mark.slow
def test_killed_evaluation_resumes_without_recomputing(tmp_path, clean_run):
    out = tmp_path / "killed"
    proc = _evaluate(out, killed_after=4, check=False)
    assert proc.returncode == 17
    before = _records(out)
    assert len(before) == 4 and not (out / "results.json").exists()
    proc = _evaluate(out)
    after = _records(out)
    assert len(after) == 6
    assert {k: after[k] for k in before} == before  # finished records untouched: only the missing were computed
    assert "records already in the store" in proc.stderr + proc.stdout
    assert _quality(out) == _quality(clean_run)


@pytest.mark.slow
def test_merge_rebuilds_the_table_from_the_store(tmp_path, clean_run):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(clean_run, out)
    table = (out / "results.md").read_text()
    (out / "results.md").unlink()
    merge = [sys.executable, "-m", "catlab.evaluation.merge", str(out)]
    proc = run_python(merge, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rebuilt = (out / "results.md").read_text()
    assert rebuilt.splitlines()[:4] == table.splitlines()[:4]
