"""The package's shape: no import circles (type-only imports counted), no upward imports, one assembly for
both loops."""

from __future__ import annotations

import importlib.util
import inspect
import re

from tests.conftest import ROOT


def _script():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "experiments" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_import_circles_and_no_upward_imports():
    found = _script().findings()
    assert found == {"module circles": [], "room circles": [], "upward imports": []}, found


def test_the_script_finds_a_circle_and_an_upward_import(tmp_path):
    graph = _script()
    package = tmp_path / "catlab"
    (package / "selection").mkdir(parents=True)
    (package / "pruning").mkdir()
    (package / "__init__.py").write_text("")
    (package / "selection" / "__init__.py").write_text("")
    (package / "pruning" / "__init__.py").write_text("")
    (package / "selection" / "atedm.py").write_text("def engine():\n    from catlab.pruning.instep import Engine\n")
    (package / "pruning" / "instep.py").write_text("from catlab.selection.atedm import engine\nclass Engine: ...\n")
    # a circle closed by a type-only import is a circle too
    (package / "pruning" / "engine.py").write_text("from catlab.pruning.processors import Cached\nclass Pruner: ...\n")
    (package / "pruning" / "processors.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from catlab.pruning.engine import Pruner\n"
        "class Cached: ...\n"
    )
    found = graph.findings(package)
    assert sorted(found["module circles"]) == [
        ["catlab.pruning.engine", "catlab.pruning.processors"],
        ["catlab.pruning.instep", "catlab.selection.atedm"],
    ]
    assert found["room circles"] == [["pruning", "selection"]]
    assert found["upward imports"] == [("catlab.selection.atedm", "catlab.pruning.instep")]


def test_sampler_and_stock_pipelines_build_the_same_assembly():
    for module in ("sampler.py", "stock_pipelines.py"):
        text = (ROOT / "catlab" / module).read_text()
        assert len(re.findall(r"\bPruningSession\(", text)) == 1, module
        for wiring in ("TokenPruner(", "StepPlanner(", "graphs_of(", "MacCounter(", "ReuseHook(", "KVReuse("):
            assert wiring not in text, f"{module} wires {wiring} by hand"


def test_the_samplers_run_is_a_thin_driver():
    from catlab.sampler import _Generation

    lines = inspect.getsource(_Generation.__init__).splitlines()
    assert len(lines) < 15, lines
