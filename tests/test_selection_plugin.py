"""A selection strategy shipped as a separate package reaches ``python -m catlab.run``.

The example package (``tests/plugins/catlab_example_plugin``) is pip-installed
into a temporary folder, which is put on ``PYTHONPATH``: its ``catlab.plugins``
entry point registers the selector, its ``catlab.conf`` entry point adds
``selector/example_center.yaml`` to Hydra's search path.
"""

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from catlab.registry import REGISTRIES, selectors
from catlab.testing import check_policy

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "tests" / "plugins" / "catlab_example_plugin"


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plugin")
    source, target = tmp / "src", tmp / "site"
    shutil.copytree(PLUGIN, source)  # build outside the repository
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "--target",
        str(target),
        str(source),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"installing the example plugin failed:\n{proc.stdout}\n{proc.stderr}")
    return {**os.environ, "PYTHONPATH": f"{target}{os.pathsep}{ROOT}", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


@pytest.mark.slow
def test_plugin_selector_runs_through_the_cli(plugin_env, tmp_path):
    """Installed, the package registers its selector through its entry point and ships its config."""
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "catlab.run",
        "selector=example_center",
        "selector.start_step=3",
        "sampler.num_steps=6",
        "sampler.progress=false",
        "num_images=1",
        "batch_size=1",
        "logger=local",
        f"hydra.run.dir={run_dir}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=plugin_env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["selector"] == "example_center" and metrics["pruned_steps"] == 3


@pytest.fixture
def example_plugin_loaded(monkeypatch):
    """The example plugin's module imported in-process, as its entry point would be; unregistered afterwards.

    The registries are swapped for copies for the test, so the plugin's components leave with them.
    """
    for registry in REGISTRIES.values():
        monkeypatch.setattr(registry, "_entries", dict(registry._entries))
    if "example_center" in selectors.names():  # an installed plugin's entry point registered it (this or the docs')
        yield type(selectors.build({"name": "example_center"})).__module__
        return
    monkeypatch.syspath_prepend(str(PLUGIN / "src"))
    importlib.import_module("catlab_example_plugin.selector")
    yield "catlab_example_plugin.selector"
    for module in [m for m in sys.modules if m.split(".")[0] == "catlab_example_plugin"]:
        del sys.modules[module]


def test_catlabs_own_walks_hold_with_a_plugin_loaded(example_plugin_loaded):
    """The tests that walk every built-in component pass beside a plugin, which answers to check_policy."""
    from tests import test_conf, test_selection_ops, test_sync

    assert "example_center" in selectors.names() and "example_center" not in selectors.builtin_names()
    assert type(selectors.build({"name": "example_center"})).__module__ == example_plugin_loaded
    assert not example_plugin_loaded.startswith("catlab.")
    for group in test_conf.GROUPS:
        test_conf.test_every_component_has_a_config(group)
    test_selection_ops.test_every_registered_selector_has_a_bound()
    test_sync.test_declared_host_reads_are_the_known_ones()
    assert check_policy(selectors.build({"name": "example_center"})) == 8
