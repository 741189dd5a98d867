"""Before the GPU checks spend any device time: is every module they need here?

``experiments/gpu_check.sh`` runs this first. It reads (without importing anything
heavy) the imports of every file the checks run — the project's package, the CUDA
tests and what they import, the benchmark — and the requirements each third-party
distribution declares, and names everything missing in one go, with where it comes
from, so a machine without network learns in a second what the run would have died
of minutes later. ``--import`` then imports the modules too (slower: torch, diffusers).

    PYTHONPATH=$PWD python experiments/gpu_preflight.py            # exit 0: ready; 1: one line per missing module
    PYTHONPATH=$PWD python experiments/gpu_preflight.py --import   # ... and import them all
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.metadata as metadata
import importlib.util
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: the files the three parts of the check run, besides the package itself
ENTRY_FILES = [
    "experiments/gpu_bench.py",
    "tests/conftest.py",
    "tests/test_graphs.py",
    "tests/test_sync.py",
    "tests/test_diffusers_hooks.py",
    "tests/test_compile.py",
]
OWN = {"catlab", "tests", "hydra_plugins", "experiments"}
#: imported inside functions the checks call (not seen at module level)
LAZY = {
    "sklearn": "catlab/selection/clustering.py",
    "scipy": "catlab/selection/clustering.py",
    "torch_geometric": "catlab/selection/pooling.py",
}
WHEELS = {"diffusers", "hydra", "omegaconf", "antlr4", "importlib_metadata"}


def imported_packages(path: Path) -> set[str]:
    """Top-level packages a file imports when it is loaded (module level, outside ``try``, absolute)."""
    names = set()
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names - OWN - set(sys.stdlib_module_names) - {"__future__"}


def requirements(package: str) -> list[str]:
    """The distributions the installed ``package`` requires (no extras, markers that hold here)."""
    dists = _distributions().get(package, [])
    out = []
    for dist in dists:
        for line in metadata.requires(dist) or []:
            name, _, marker = line.partition(";")
            if marker and ("extra" in marker or not _marker_holds(marker)):
                continue
            out.append(re.split(r"[\s<>=!~\[(]", name.strip(), maxsplit=1)[0])
    return out


@functools.cache
def _distributions() -> dict:
    return metadata.packages_distributions()


def _marker_holds(marker: str) -> bool:
    try:
        from packaging.markers import Marker
    except ImportError:  # without packaging: count the requirement as needed
        return True
    return Marker(marker).evaluate()


def _installed(dist: str) -> bool:
    try:
        metadata.version(dist)
        return True
    except metadata.PackageNotFoundError:
        return False


def _source(name: str) -> str:
    return (
        "a wheel: pip download it into .whl/ on a machine with PyPI (docs/performance.md)"
        if name.replace("-", "_").lower() in WHEELS or name.lower() in {"hydra-core", "antlr4-python3-runtime"}
        else "not on this machine"
    )


def missing() -> list[str]:
    """One line per module or distribution the checks need and this Python cannot find."""
    files = [*sorted((ROOT / "catlab").rglob("*.py")), *(ROOT / f for f in ENTRY_FILES)]
    needed: dict[str, str] = dict(LAZY)
    for path in files:
        for name in imported_packages(path):
            needed.setdefault(name, str(path.relative_to(ROOT)))
    problems = [
        f"{name}: not installed (imported by {where}); {_source(name)}"
        for name, where in sorted(needed.items())
        if importlib.util.find_spec(name) is None
    ]
    for name in sorted(needed):
        if importlib.util.find_spec(name) is None:
            continue
        for dist in requirements(name):
            if not _installed(dist):
                problems.append(f"{dist}: not installed (required by {name}); {_source(dist)}")
    return list(dict.fromkeys(problems))


def import_all() -> list[str]:
    """Import the package's modules the checks use and the benchmark; one line per failure."""
    problems = []
    sys.path.insert(0, str(ROOT))
    for name in [
        "catlab",
        "catlab.sampler",
        "catlab.run",
        "catlab.pruning.graphs",
        "catlab.testing",
        "tests.conftest",
        "tests.test_graphs",
        "tests.test_sync",
    ]:
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 - any failure to import is what this reports
            problems.append(f"{name}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "experiments" / "gpu_bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_bench"] = module  # its dataclasses look themselves up there
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001
        problems.append(
            f"experiments/gpu_bench.py: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        )
    return problems


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    start = time.perf_counter()
    problems = missing()
    if not problems and "--import" in argv:
        problems = import_all()
    for line in problems:
        print(f"gpu_preflight: {line}", file=sys.stderr)
    if problems:
        print("gpu_preflight: install what is missing first (docs/performance.md, 'The GPU checks')", file=sys.stderr)
        return 1
    print(
        f"gpu_preflight: every module the checks import is here ({time.perf_counter() - start:.1f} s"
        f"{', imported' if '--import' in argv else ''})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
