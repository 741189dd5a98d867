"""docs/plugins.md followed word for word: its file tree, its files, its install line, its commands, its test.

Nothing is added that the page does not say: the files are the tree's (empty where the
page says so), with the contents of the blocks that name them; the ``pip`` line and
the ``python`` lines are the page's, with arguments appended that keep the install
offline (``--no-deps --no-build-isolation --no-index``, into a scratch ``--target``)
and the runs small (as tests/test_docs_commands.py shrinks every documented run).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "plugins.md"
TREE_CHARS = "│├└─ \u00a0"


def blocks(text: str) -> list[tuple[str, list[str], str]]:
    """(language, lines, the heading above) of every fenced block."""
    out, block, lang, heading = [], None, "", ""
    for line in text.splitlines():
        if line.startswith("#") and block is None:
            heading = line.lstrip("# ").strip()
        if line.startswith("```"):
            if block is None:
                block, lang = [], line[3:].strip()
            else:
                out.append((lang, block, heading))
                block = None
            continue
        if block is not None:
            block.append(line)
    return out


def tree_paths(lines: list[str]) -> list[str]:
    """The files of a ``text`` tree drawing (``├── name  # comment``); folders end with ``/``."""
    paths, stack = [], []
    for line in lines:
        body = line.split("#")[0].rstrip()
        name = body.lstrip(TREE_CHARS)
        if not name:
            continue
        depth = (len(body) - len(name)) // 4
        stack[depth:] = [name.rstrip("/")]
        if not name.endswith("/"):
            paths.append("/".join(stack[1:]))  # relative to the tree's root folder
    return paths


def page():
    all_blocks = blocks(DOC.read_text())
    tree = next(b for lang, b, _ in all_blocks if lang == "text" and b and b[0].endswith("/"))
    root = tree[0].rstrip("/")
    files = {
        b[0][2:].strip(): "\n".join(b) + "\n"
        for lang, b, _ in all_blocks
        if lang in ("python", "yaml", "toml") and b and re.fullmatch(r"# [\w./-]+\.\w+", b[0].strip())
    }
    commands = [
        line.strip()
        for lang, b, _ in all_blocks
        if lang == "bash"
        for line in b
        if line.strip().startswith(("pip ", "python "))
    ]
    return root, tree_paths(tree), files, commands


def test_the_page_shows_the_tree_first_and_every_file_in_it():
    text = DOC.read_text()
    root, paths, files, commands = page()
    assert text.index("```text") < text.index("```python"), "the file tree comes before the code"
    assert set(files) <= set(paths), f"files shown but not in the tree: {set(files) - set(paths)}"
    empty = [p for p in paths if p not in files]
    assert empty and all(p.endswith("__init__.py") for p in empty), empty
    assert root == "my-strategy" and any(c.startswith("pip install") for c in commands)


@pytest.mark.slow
def test_the_plugin_built_as_the_page_says_installs_runs_and_passes_its_test(tmp_path):
    root, paths, files, commands = page()
    for rel in paths:
        path = tmp_path / root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(files.get(rel, ""))
    site = tmp_path / "site"
    env = {
        **os.environ,
        "PYTHONPATH": f"{site}{os.pathsep}{ROOT}",
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    shrink = [
        "sampler.num_steps=4",
        "selector.start_step=2",
        "num_images=1",
        "sampler.progress=false",
        "logger=local",
        "threads=1",
        f"hydra.run.dir={tmp_path / 'run'}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    for cmd in commands:
        argv = shlex.split(cmd)
        if argv[0] == "pip":
            argv = [
                sys.executable,
                "-m",
                *argv,
                "--quiet",
                "--no-deps",
                "--no-build-isolation",
                "--no-index",
                "--target",
                str(site),
            ]
        elif "catlab.run" in cmd:
            argv = [sys.executable, *argv[1:], *shrink]
        else:
            argv = [sys.executable, *argv[1:], "-q", "-p", "no:cacheprovider"]
        proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"`{cmd}` failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["selector"] == "example_center" and metrics["alpha"] == 0.5
    summary = (tmp_path / "sweep" / "summary.md").read_text()
    assert summary.count("| done |") == 3, summary
