"""Every shell command in README.md and docs/ runs: a command a reader copies must work.

The fenced ``bash``/``sh`` blocks are read line by line (with ``\\`` continuations).
Each command that a CPU can run is executed as written, in one scratch working
directory shared in document order (so relative paths such as ``outputs/...``
land there, and a stage that reads another stage's output finds it), with
arguments appended that shrink the work: a few denoising or training steps, one
image, a local logger. Hydra and argparse both let a later argument win, so the
command itself is unchanged. Commands that need a GPU, model weights from a hub,
a cluster or an installed plugin are skipped with the reason shown.

``python -m ...`` and ``python script.py ...`` commands run one after another in one
interpreter (tests/doc_runner.py: the imports are paid once); a command that fails
there is run again in a fresh interpreter, and only that verdict counts. A command
must exit 0 and leave what it promises: ``catlab.run`` its metrics and images (one set
per job of a multirun), ``catlab.evaluate`` its table with the full model's row.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import warnings
from itertools import count
from pathlib import Path

import pytest

from tests.conftest import shared_interpreter

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

#: (pattern, why it cannot run here); the first match wins
NOT_ON_A_CPU = [
    (
        r"sd3_medium|pixart_sigma|flux_dev|model=qwen_image\b|experiment=(sd3|pixart)_",
        "needs real SD3 / PixArt-Sigma / FLUX.1 / Qwen-Image weights and a GPU",
    ),
    (r"hydra/launcher=slurm\b", "needs a SLURM cluster"),
    (r"^torchrun", "a multi-GPU launch (tests/test_scaling.py runs torchrun on 2 CPU processes)"),
    (r"gpu_bench\.py(?!.*--device cpu)", "the GPU benchmark (tests/test_gpu_bench.py runs it on a CPU)"),
    (r"catlab\.evaluation\.merge outputs/sd3", "merges a GPU evaluation's run directory"),
    (r"example_center", "needs the example plugin installed (tests/test_selection_plugin.py installs and runs it)"),
    (
        r"experiment=embedded_frontier",
        "its rows set their own warm-ups (t0 up to 12), beyond the 4 shrunk steps: "
        "tests/test_frontier_cli.py runs every row at 14 steps",
    ),
    (
        r"^pip download",
        "fetches wheels from PyPI for a GPU machine without network (tests/test_gpu_bench.py runs the pre-flight)",
    ),
    (
        r"^pip install|-m pytest|-m venv|^ruff ",
        "the CI script makes the environment, installs and runs the test suite itself",
    ),
    *(
        []
        if os.environ.get("CATLAB_TEST_INDUCTOR") == "1"
        else [
            (
                r"gpu_bench\.py .*--device cpu.*--compile\b",
                "compiles with torch inductor (minutes on a small CPU, the slowest command by far): "
                "set CATLAB_TEST_INDUCTOR=1 to run it, as for tests/test_compile.py",
            )
        ]
    ),
]

#: appended to each kind of command: the same code path, a fraction of the work
SHRINK = {
    "catlab.run": [
        "sampler.num_steps=4",
        "selector.start_step=2",
        "num_images=1",
        "sampler.progress=false",
        "logger=local",
        "threads=1",
    ],
    "catlab.evaluate": [
        "num_prompts=1",
        "seeds=[0]",
        "sampler.num_steps=4",
        "++strategy_defaults.start_step=2",
        "batch_size=1",
        "metrics=[psnr]",
        "diagnostics=false",
        "save_images=false",
        "warmup=false",
        "repeats=1",
        "threads=1",
        "logger=local",
    ],
    "catlab.train_toy": ["steps=2", "batch_size=4", "sample_every=0", "sample_steps=2", "log_every=1"],
    "catlab.embedded.probe": ["--steps", "2", "--out", "outputs/probe"],
    "catlab.train_video": ["steps=2", "batch_size=2", "sample_every=0", "log_every=1", "max_minutes=null"],
    "catlab.embedded.video_probe": ["--prompts", "2", "--steps", "2"],
    "embedded_eval.py": ["--n", "2", "--steps", "2", "--grid-n", "2"],
    "selection_stats.py": ["--n", "1", "--steps", "10", "--selectors", "cat,sequential"],
    "gpu_bench.py": [
        "--hidden",
        "64",
        "--tokens",
        "64",
        "--steps",
        "3",
        "--start-step",
        "1",
        "--repeats",
        "1",
        "--layers",
        "1",
    ],
}


def doc_commands(path: Path) -> list[str]:
    """The shell commands of a markdown file's fenced bash/sh blocks, continuations joined, comments cut."""
    commands, lang, pending = [], None, ""
    for line in path.read_text().splitlines():
        text = line.strip()
        if text.startswith("```"):
            lang = None if lang is not None else (text[3:].strip() or "text")
            continue
        if lang not in ("bash", "sh", "shell", "text"):
            continue
        if pending or text.startswith(("python ", "torchrun ", "pip ", "ruff ")):
            pending = f"{pending} {text.rstrip(chr(92)).strip()}".strip()
            if not text.endswith("\\"):
                commands.append(re.sub(r"\s+#.*$", "", pending).strip())
                pending = ""
    return commands


def _all_commands() -> list[tuple[str, str]]:
    seen, out = set(), []
    for path in DOCS:
        for cmd in doc_commands(path):
            if cmd not in seen:
                seen.add(cmd)
                out.append((str(path.relative_to(ROOT)), cmd))
    return out


COMMANDS = _all_commands()


def _shrunk(cmd: str, work: Path, runs: Path | None = None) -> list[str]:
    argv = shlex.split(cmd)
    kind = next((k for k in SHRINK if k in cmd), None)
    extra = list(SHRINK.get(kind, []))
    runs = runs or work
    if kind in ("catlab.run", "catlab.evaluate"):
        extra += [f"hydra.run.dir={runs / 'hydra_run'}", f"hydra.sweep.dir={runs / 'hydra_sweep'}"]
    argv = [sys.executable if a == "python" else a for a in argv]
    argv = [str(ROOT / a) if a.startswith("experiments/") else a for a in argv]
    return argv + extra


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """The scratch working directory, with copies of the shipped bundles at their repository paths: a command
    that reads ``catlab/embedded/bundle`` finds it, and one that exports there writes into the copy."""
    import shutil

    work = tmp_path_factory.mktemp("docs_commands")
    for bundle in sorted((ROOT / "catlab" / "embedded").glob("bundle*")):
        if bundle.is_dir():
            shutil.copytree(bundle, work / "catlab" / "embedded" / bundle.name)
    return work


@pytest.fixture(scope="module")
def runner():
    """The session's shared interpreter (tests/doc_runner.py), which the command-line tests use too."""
    return shared_interpreter()


def _promised(cmd: str, runs: Path) -> str | None:
    """What the command should have left and did not; None when all is there."""
    words = shlex.split(cmd)
    module = words[2] if len(words) > 2 and words[1] == "-m" else None
    if module == "catlab.run":
        multirun = bool({"-m", "--multirun"} & set(words[3:]))
        jobs = sorted(p for p in (runs / "hydra_sweep").iterdir() if p.is_dir()) if multirun else [runs / "hydra_run"]
        if not jobs:
            return "a multirun without job directories"
        for job in jobs:
            metrics = job / "metrics.json"
            if not metrics.exists() or "macs_ratio" not in json.loads(metrics.read_text()):
                return f"no metrics.json with macs_ratio in {job}"
            if not list((job / "images").glob("*.png")):
                return f"no images in {job / 'images'}"
    elif module == "catlab.evaluate":
        table = runs / "hydra_run" / "results.md"
        if not table.exists() or "| full |" not in table.read_text():
            return f"no results table with the full model's row in {table.parent}"
    return None


def test_the_docs_have_commands():
    assert len(COMMANDS) > 20 and any("catlab.run" in c for _, c in COMMANDS)


RUN_IDS = count()


@pytest.mark.slow
@pytest.mark.parametrize("source, cmd", COMMANDS, ids=[f"{s}:{c[:60]}" for s, c in COMMANDS])
def test_doc_command_runs(source, cmd, work, runner):
    reason = next((why for pattern, why in NOT_ON_A_CPU if re.search(pattern, cmd)), None)
    if reason:
        pytest.skip(f"{source}: {reason}")
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "CATLAB_CACHE": str(work / "cache"),
        "PYTHONPATH": str(ROOT),
    }
    runs = work / "runs" / str(next(RUN_IDS))
    runs.mkdir(parents=True)
    argv = _shrunk(cmd, work, runs)
    rc, output = None, ""
    if argv[0] == sys.executable and len(argv) > 1 and (argv[1] == "-m" or argv[1].endswith(".py")):
        log = runs / "output.txt"
        rc = runner.run(argv[1:], work, env, log)
        output = log.read_text(errors="replace") if log.exists() else ""
    if rc != 0:  # not a python command, or it failed in the shared interpreter: a fresh one decides
        if rc is not None:
            warnings.warn(
                f"{source}: `{cmd}` failed in the shared interpreter (rc {rc}); rerun in a fresh one", stacklevel=2
            )
        proc = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=600)
        rc, output = proc.returncode, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert rc == 0, f"{source}: `{cmd}` failed:\n{output[-5000:]}"
    missing = _promised(cmd, runs)
    assert missing is None, f"{source}: `{cmd}` exited 0 but left {missing}:\n{output[-3000:]}"


def test_ci_runs_the_readme_set_up_and_test_commands_in_order():
    """.ci/run is the README's first command block (set-up and main job), its lint and its test command, in order."""
    readme = doc_commands(ROOT / "README.md")
    setup = readme[: readme.index("python -m catlab.run selector=cat clusterer=kmeans") + 1]
    lint = next(c for c in readme if c.startswith("ruff "))
    test = next(c for c in readme if c.startswith("python -m pytest"))
    ci = [re.sub(r"\s+#.*$", "", line).strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    ci = [c for c in ci if c and not c.startswith(("#", "set ", "cd ", "export "))]
    assert ci == [*setup, lint, test]
