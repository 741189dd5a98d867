"""Log lines a user reads without the code: a part's line names its selector; a shadowed package says where it is."""

import logging
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import catlab
from catlab.testing import simulate

ROOT = Path(__file__).resolve().parents[1]


def test_a_clusterer_line_names_the_selector_it_serves(caplog):
    policy = catlab.selectors.build({"name": "cat_rankmix", "start_step": 2})  # kmeans, 20 clusters per 4096 tokens
    with caplog.at_level(logging.INFO, logger="catlab"):
        simulate(policy, grid=(16, 16), num_steps=4)
    lines = [r.getMessage() for r in caplog.records if "clusters for 256 tokens" in r.getMessage()]
    assert lines and lines[0].startswith("cat_rankmix's clusterer kmeans: 2 clusters for 256 tokens"), lines


def test_a_folder_named_catlab_that_shadows_the_package_is_named(tmp_path):
    """As with an editable install, whose finder comes after the working directory on the import path."""
    (tmp_path / "catlab" / "embedded").mkdir(parents=True)  # e.g. a copy of the bundles, no __init__.py
    script = textwrap.dedent(f"""
        import runpy, sys
        from importlib.machinery import PathFinder

        class Editable:  # submodules of catlab come from the repository, catlab itself is left to the path
            @classmethod
            def find_spec(cls, name, path=None, target=None):
                if name.rpartition(".")[0] == "catlab":
                    return PathFinder.find_spec(name, [{str(ROOT / "catlab")!r}])
                return None

        sys.meta_path.insert(0, Editable)
        sys.argv = ["catlab.run", "logger=local"]
        runpy.run_module("catlab.run", run_name="__main__")
    """)
    env = {"PATH": "/usr/bin:/bin", "WANDB_MODE": "offline"}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert f"found the folder {tmp_path / 'catlab'}" in last and str(ROOT / "catlab") in last, proc.stderr[-2000:]


@pytest.mark.slow
def test_a_piped_evaluation_logs_its_progress_with_an_eta(tmp_path):
    """Not a terminal: progress comes as log lines at the set interval (here 0.2 s, by default 30 s) with an ETA."""
    import os
    import re

    env = {**os.environ, "CATLAB_PROGRESS_INTERVAL": "0.2", "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"}
    overrides = [
        "model=tiny_sd3",
        "model.num_layers=1",
        "model.height=16",
        "model.width=16",
        "sampler.num_steps=4",
        "+strategy_defaults.start_step=2",
        "strategies=[full,random]",
        "batch_size=1",
        "prompts.prompts=[a red circle,a blue square,a green star]",
        "metrics=[psnr]",
        "diagnostics=false",
        "save_images=false",
        f"cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "catlab.evaluate", *overrides],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in (done.stdout + done.stderr).splitlines() if "evaluation: " in line]
    progress = [line for line in lines if re.search(r"evaluation: \d+/6 strategy×batch .*ETA ", line)]
    assert len(progress) >= 2, lines  # at least one line while running, and the last one
    assert "evaluation: 6/6 strategy×batch (100%)" in progress[-1] and "ETA 0 s" in progress[-1]
    assert any(re.search(r"ETA \d+ (s|min)", line) for line in progress[:-1]), progress


def test_progress_lines_say_done_total_and_eta(caplog):
    from catlab.progress import Progress, duration

    with caplog.at_level(logging.INFO, logger="catlab.progress"):
        with Progress(4, "sweep", "jobs", tty=False) as p:
            assert "ETA unknown" in p.line()
            p.update(1, "selector=cat")
            assert re.search(r"sweep: 1/4 jobs \(25%\), elapsed \d+ s, ETA \d+ s, last: selector=cat", p.line())
            p.update(3)
    assert caplog.records[0].getMessage() == "sweep: 4 jobs to do"
    assert caplog.records[-1].getMessage().startswith("sweep: 4/4 jobs (100%)")
    assert (duration(5), duration(125), duration(3725)) == ("5 s", "2 min 05 s", "1 h 02 min")
