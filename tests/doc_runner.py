"""One interpreter that runs ``python -m module ...`` / ``python script.py ...`` commands in turn.

The documented commands (tests/test_docs_commands.py) and the command-line runs the
tests expect to succeed (``tests.conftest.run_cli``) go through one such interpreter
per test session (:class:`Interpreter`, the client side), which sends it one command
per line (JSON: argv without the interpreter, cwd, environment, output file and,
optionally, a separate file for stderr); it answers one JSON line ``{"rc": ...}``.
torch, diffusers and Hydra are imported once instead of once per command, which is
most of a small command's time. Each command runs as ``python -m`` would run it
(``runpy``, ``__main__``, its own ``sys.argv``), its stdout and stderr (file
descriptors included, so subprocesses' output too) go to its output files, and the
state a command leaves behind that the next could trip on is cleared: Hydra's global
instance, logging handlers, the working directory, the environment, torch's thread
count.
"""

from __future__ import annotations

import json
import logging
import os
import runpy
import subprocess
import sys
import traceback
from pathlib import Path


class Interpreter:
    """The client side: this script started on first use (and again if it died), fed one command at a time."""

    def __init__(self):
        self.proc = None

    def run(self, argv: list[str], cwd: Path, env: dict, out: Path, err: Path | None = None) -> int:
        """Run ``argv`` (without the interpreter) as ``python`` would; its output goes to ``out`` (and ``err``)."""
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen(
                [sys.executable, __file__],
                cwd=Path(__file__).resolve().parents[1],
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        job = {"argv": argv, "cwd": str(cwd), "env": env, "out": str(out), "err": str(err or out)}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        return json.loads(line)["rc"] if line else -1

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def _clear_hydra() -> None:
    try:
        from hydra.core.global_hydra import GlobalHydra

        GlobalHydra.instance().clear()
    except ImportError:
        pass


def run_one(job: dict) -> int:
    argv, env, base_env = job["argv"], job["env"], dict(os.environ)
    start_cwd, path, threads = os.getcwd(), list(sys.path), None
    try:
        import torch

        threads = torch.get_num_threads()
    except ImportError:
        pass
    out = os.open(job["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    separate = job.get("err", job["out"]) != job["out"]
    err = os.open(job["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC) if separate else out
    saved = os.dup(1), os.dup(2)
    sys.stdout.flush(), sys.stderr.flush()
    os.dup2(out, 1), os.dup2(err, 2)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(job["cwd"])
    rc = 0
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as stop:
        rc = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:  # noqa: BLE001  (reported as the command's failure)
        traceback.print_exc()
        rc = 1
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(saved[0], 1), os.dup2(saved[1], 2)
        os.close(out), os.close(saved[0]), os.close(saved[1])
        if separate:
            os.close(err)
        os.chdir(start_cwd)
        os.environ.clear()
        os.environ.update(base_env)
        sys.path[:] = path
        _clear_hydra()
        for handler in list(logging.root.handlers):
            logging.root.removeHandler(handler)
        if threads is not None:
            torch.set_num_threads(threads)
    return rc


def main() -> None:
    reply = os.fdopen(os.dup(1), "w")
    import diffusers  # noqa: F401
    import torch  # noqa: F401  (the imports every command shares, paid once)

    import catlab.builders  # noqa: F401

    for line in sys.stdin:
        if line.strip():
            reply.write(json.dumps({"rc": run_one(json.loads(line))}) + "\n")
            reply.flush()


if __name__ == "__main__":
    main()
