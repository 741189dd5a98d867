"""Every shell command in README.md and docs/ runs: a command a reader copies must work.

The fenced ``bash``/``sh`` blocks are read line by line (with ``\\`` continuations).
Each command that a CPU can run is executed as written, in one scratch working
directory shared in document order (so relative paths such as ``outputs/...``
land there, and a stage that reads another stage's output finds it), with
arguments appended that shrink the work: a few denoising or training steps, one
image, a local logger. Hydra and argparse both let a later argument win, so the
command itself is unchanged. Commands that need a GPU, model weights from a hub,
a cluster or an installed plugin are skipped with the reason shown.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

#: (pattern, why it cannot run here); the first match wins
NOT_ON_A_CPU = [
    (r"sd3_medium|pixart_sigma|flux_dev|experiment=(sd3|pixart)_", "needs real SD3 / PixArt-Sigma / FLUX.1 weights and a GPU"),
    (r"hydra/launcher=slurm\b", "needs a SLURM cluster"),
    (r"^torchrun", "a multi-GPU launch (tests/test_scaling.py runs torchrun on 2 CPU processes)"),
    (r"gpu_bench\.py(?!.*--device cpu)", "the GPU benchmark (tests/test_gpu_bench.py runs it on a CPU)"),
    (r"catlab\.evaluation\.merge outputs/sd3", "merges a GPU evaluation's run directory"),
    (r"example_center", "needs the example plugin installed (tests/test_selection_plugin.py installs and runs it)"),
    (r"^pip install|-m pytest|-m venv", "the CI script makes the environment, installs and runs the test suite itself"),
]

#: appended to each kind of command: the same code path, a fraction of the work
SHRINK = {
    "catlab.run": ["sampler.num_steps=4", "selector.start_step=2", "num_images=1", "sampler.progress=false",
                   "logger=local", "threads=1"],
    "catlab.evaluate": ["num_prompts=1", "seeds=[0]", "sampler.num_steps=4", "++strategy_defaults.start_step=2",
                        "batch_size=1", "metrics=[psnr]", "diagnostics=false", "save_images=false", "warmup=false",
                        "repeats=1", "threads=1", "logger=local"],
    "catlab.train_toy": ["steps=2", "batch_size=4", "sample_every=0", "sample_steps=2", "log_every=1"],
    "catlab.embedded.probe": ["--steps", "2", "--out", "outputs/probe"],
    "embedded_eval.py": ["--n", "2", "--steps", "2", "--grid-n", "2"],
    "selection_stats.py": ["--n", "1", "--steps", "10", "--selectors", "cat,sequential"],
    "gpu_bench.py": ["--hidden", "64", "--tokens", "64", "--steps", "3", "--start-step", "1", "--repeats", "1", "--layers", "1"],
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
        if pending or text.startswith(("python ", "torchrun ", "pip ")):
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


def _shrunk(cmd: str, work: Path) -> list[str]:
    argv = shlex.split(cmd)
    kind = next((k for k in SHRINK if k in cmd), None)
    extra = list(SHRINK.get(kind, []))
    if kind in ("catlab.run", "catlab.evaluate"):
        extra += [f"hydra.run.dir={work / 'hydra_run'}", f"hydra.sweep.dir={work / 'hydra_sweep'}"]
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


def test_the_docs_have_commands():
    assert len(COMMANDS) > 20 and any("catlab.run" in c for _, c in COMMANDS)


@pytest.mark.parametrize("source, cmd", COMMANDS, ids=[f"{s}:{c[:60]}" for s, c in COMMANDS])
def test_doc_command_runs(source, cmd, work):
    reason = next((why for pattern, why in NOT_ON_A_CPU if re.search(pattern, cmd)), None)
    if reason:
        pytest.skip(f"{source}: {reason}")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "CATLAB_CACHE": str(work / "cache"),
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(_shrunk(cmd, work), cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{source}: `{cmd}` failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"


def test_ci_runs_the_readme_set_up_and_test_commands_in_order():
    """.ci/run is the README's first command block (set-up and main job) and its test command, in order."""
    readme = doc_commands(ROOT / "README.md")
    setup = readme[: readme.index("python -m catlab.run selector=cat clusterer=kmeans") + 1]
    test = next(c for c in readme if c.startswith("python -m pytest"))
    ci = [re.sub(r"\s+#.*$", "", line).strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    ci = [c for c in ci if c and not c.startswith(("#", "set ", "cd ", "export "))]
    assert ci == [*setup, test]
