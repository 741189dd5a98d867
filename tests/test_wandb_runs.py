"""W&B, offline, read back from the run folder: what a W&B user finds in a run, a sweep and an evaluation.

The ``.wandb`` file is read with :func:`catlab.loggers.wandb_logger.offline_records` (no service,
no network); media and saved files are looked up in the run's ``files/`` folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from catlab.loggers.wandb_logger import offline_records
from tests.conftest import ROOT


def _cli(module: str, *args: str, cwd: Path) -> None:
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "PYTHONPATH": str(ROOT),
        "CATLAB_CACHE": str(cwd / "cache"),
    }
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _run(job_dir: Path):
    """(the run record, the run's files/ folder) of the one offline W&B run in a job directory."""
    (run_folder,) = (job_dir / "wandb").glob("offline-run-*")
    (wandb_file,) = run_folder.glob("*.wandb")
    run = next(message for kind, message in offline_records(wandb_file) if kind == "run")
    return run, run_folder / "files"


def _config(run) -> dict:
    return {item.key: json.loads(item.value_json) for item in run.config.update}


@pytest.mark.slow
def test_sweep_jobs_are_one_group_and_keep_their_files(tmp_path):
    sweep = tmp_path / "multirun" / "2026-12-05" / "10-00-00"
    _cli(
        "catlab.run",
        "-m",
        "selector=full,random",
        "sampler.num_steps=4",
        "selector.start_step=2",
        "num_images=1",
        "sampler.progress=false",
        "threads=1",
        "logger=wandb",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    groups = set()
    for job in ("0", "1"):
        run, files = _run(sweep / job)
        groups.add(run.run_group)
        assert _config(run)["selector"]["name"] == ("full", "random")[int(job)]
        for name in ("config.yaml", "metrics.json", "run.log"):  # saved with the run, as the job wrote them
            assert (files / name).read_text() == (sweep / job / name).read_text()
        assert json.loads((files / "metrics.json").read_text())["selector"] == ("full", "random")[int(job)]
        assert list((files / "media" / "images").glob("samples_*.png"))
    assert groups == {"default:2026-12-05/10-00-00"}


@pytest.mark.slow
def test_an_evaluation_logs_its_table_samples_plots_and_config(tmp_path):
    out = tmp_path / "eval"
    _cli(
        "catlab.evaluate",
        "model=tiny_sd3",
        "model.num_layers=1",
        "model.height=16",
        "model.width=16",
        "sampler.num_steps=4",
        "+strategy_defaults.start_step=2",
        "strategies=[full,random]",
        "batch_size=2",
        "num_prompts=2",
        "seeds=[0]",
        "prompts.prompts=[a red circle,a blue square]",
        "metrics=[psnr,ssim]",
        "diagnostics=true",
        "threads=1",
        "logger=wandb",
        f"hydra.run.dir={out}",
        cwd=tmp_path,
    )
    run, files = _run(out)
    assert _config(run)["strategies"] == ["full", "random"]
    assert (files / "config.yaml").exists() and (files / "results.md").exists()

    (table_file,) = (files / "media" / "table").glob("results_*.table.json")
    table = json.loads(table_file.read_text())
    cols = table["columns"]
    assert {"method", "macs_ratio", "seconds_per_image", "speedup", "selection_share", "psnr", "ssim"} <= set(cols)
    rows = {r[cols.index("method")]: dict(zip(cols, r)) for r in table["data"]}
    results = {r["method"]: r for r in json.loads((out / "results.json").read_text())}
    assert set(rows) == {"full", "random"}
    assert rows["random"]["psnr"] == pytest.approx(results["random"]["psnr"])
    assert (
        rows["random"]["macs_ratio"] == pytest.approx(results["random"]["macs_ratio"])
        and rows["random"]["macs_ratio"] > 1.2
    )

    images = {p.name.rsplit("_", 2)[0] for p in (files / "media" / "images" / "samples").glob("*.png")}
    assert {i.rsplit("-", 1)[0] for i in images} == {"full", "random"} and len(images) == 2  # a grid per strategy
    plots = {p.name.rsplit("_", 2)[0] for p in (files / "media" / "images" / "plots").glob("*.png")}
    assert {"cost_quality", "pareto", "selection_maps", "comparison"} <= plots  # strategies side by side per prompt
    assert _config(run)["title"] == "2 prompts × 1 seed, 4 steps, CFG 7"  # the title of what ran
