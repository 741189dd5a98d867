"""Shared fixtures: tiny SD3 and PixArt transformers built from configs with seeded weights."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

# One intra-op thread for the session and the commands it starts (unless OMP_NUM_THREADS says otherwise): models
# this small only lose from more, and two threads on a busy 2-core machine stall (3.5x the CPU time measured)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
os.environ.setdefault("WANDB_SILENT", "true")
pytest.register_assert_rewrite("tests.family_checks")  # its asserts report their values, as a test's do
ROOT = Path(__file__).resolve().parents[1]


def tiny_sd3(**overrides):
    from catlab.families.sd3 import TinySD3

    kw = dict(height=16, width=16, num_layers=3, num_heads=2, head_dim=16, text_dim=24, text_tokens=6)
    kw.update(overrides)
    return TinySD3(**kw)


def tiny_pixart(**overrides):
    from catlab.families.pixart import TinyPixArt

    kw = dict(height=16, width=16, num_layers=3, num_heads=2, head_dim=16, text_dim=24, text_tokens=6)
    kw.update(overrides)
    return TinyPixArt(**kw)


ADAPTERS = {
    "sd3": tiny_sd3,
    "sd35": lambda: tiny_sd3(dual_attention_layers=(0, 1), qk_norm="rms_norm"),
    "pixart": tiny_pixart,
}


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests: models this small only lose from more, a lot on a busy machine.
    A module asks for it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=sorted(ADAPTERS))
def adapter(request):
    torch.manual_seed(0)
    return ADAPTERS[request.param]()


_INTERPRETER = None


def shared_interpreter():
    """One interpreter per test session for commands that run Python (tests/doc_runner.py): imports paid once."""
    global _INTERPRETER
    if _INTERPRETER is None:
        from tests.doc_runner import Interpreter

        _INTERPRETER = Interpreter()
    return _INTERPRETER


def pytest_sessionfinish(session):
    if _INTERPRETER is not None:
        _INTERPRETER.close()


def run_python(cmd: list[str], *, cwd: Path, env: dict, timeout: int = 300, clean: tuple[Path, ...] = ()):
    """``subprocess.run(cmd)`` for a ``python -m ...`` / ``python script.py`` command expected to succeed.

    It runs first in the session's shared interpreter (the imports paid once); if it fails there, a
    fresh interpreter runs it again (after removing the folders in ``clean``) and only that verdict
    counts, so a failure is always a real one. Returns the ``CompletedProcess`` (text output).
    """
    assert cmd[0] == sys.executable, cmd
    with tempfile.TemporaryDirectory() as logs:
        out, err = Path(logs) / "stdout", Path(logs) / "stderr"
        if shared_interpreter().run(cmd[1:], cwd, env, out, err) == 0:
            outputs = out.read_text(errors="replace"), err.read_text(errors="replace")
            return subprocess.CompletedProcess(cmd, 0, *outputs)
    warnings.warn(f"`{' '.join(cmd[1:])}` failed in the shared interpreter; rerun in a fresh one", stacklevel=2)
    for folder in clean:
        shutil.rmtree(folder, ignore_errors=True)
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def run_cli(*overrides: str, tmp_path: Path, module: str = "catlab.run", check: bool = True, timeout: int = 300):
    """Run ``python -m catlab.run`` with Hydra's run dir under ``tmp_path``; return (proc, run_dir).

    A run expected to succeed (``check``) goes through :func:`run_python`, unless it picks a Hydra
    launcher; one expected to fail runs in a fresh interpreter, as a user's would.
    """
    run_dir = tmp_path / "run"
    flags = [o for o in overrides if o.startswith("-")]
    rest = [o for o in overrides if not o.startswith("-")]
    cmd = [
        sys.executable,
        "-m",
        module,
        *flags,
        f"hydra.run.dir={run_dir}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        *rest,
    ]
    env = {**os.environ, "WANDB_SILENT": "true", "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    if check and not any(o.startswith("hydra/launcher=") for o in overrides):  # a launcher starts processes
        proc = run_python(cmd, cwd=ROOT, env=env, timeout=timeout, clean=(run_dir, tmp_path / "sweep"))
    else:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc, run_dir


FAST = ("sampler.num_steps=10", "sampler.progress=false", "logger=local")


class Generation:
    """A sampler result with executed MACs per step (transformer + selection), as the step-cache tests read it."""

    def __init__(self, result):
        trace = result.trace
        self.images, self.latents = result.images, result.latents
        self.step_macs = [s.macs + s.selection_macs for s in trace.steps]
        self.full_step_macs = trace.full_step_macs
        self.computed_tokens = [s.kept for s in trace.steps]

    @property
    def macs(self) -> int:
        return sum(self.step_macs)

    @property
    def macs_ratio(self) -> float:
        """Full model's MACs / this generation's MACs (> 1: cheaper)."""
        return self.full_step_macs * len(self.step_macs) / max(self.macs, 1)


def generate(
    adapter, policy, prompts, seeds, *, num_steps=28, guidance_scale=7.0, reuse=None, step_cache=None, kv_reuse=None
) -> Generation:
    """:func:`catlab.sampler.sample` with every MAC counted as it runs."""
    from catlab.sampler import SamplerConfig, StepReuse, calibrate, sample

    cfg = SamplerConfig(num_steps=num_steps, guidance_scale=guidance_scale, progress=False, count_macs=True)
    if step_cache is not None and not step_cache.is_applied:
        calibrate(step_cache, adapter, prompts, seeds, cfg)
    return Generation(sample(adapter, policy, prompts, seeds, cfg, StepReuse(reuse, kv_reuse, step_cache)))
