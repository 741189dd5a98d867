"""Log lines a user reads without the code: a part's line names its selector; a shadowed package says where it is."""

import logging
import subprocess
import sys
import textwrap
from pathlib import Path

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
