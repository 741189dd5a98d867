"""The wall-clock benchmark runs end to end at tiny shapes on a CPU."""
from __future__ import annotations

import importlib.util
import sys

from tests.conftest import ROOT


def test_gpu_bench_tiny_on_cpu(capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "experiments" / "gpu_bench.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_bench", bench)  # its dataclass looks itself up there
    spec.loader.exec_module(bench)
    rows = bench.main(["--device", "cpu", "--tiny", "--steps", "12", "--start-step", "8", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "pruning policy:" in out and "speed-up" in out
    assert [(r["model"], r["steps"]) for r in rows] == [("sd3", 12), ("pixart", 12)]
    for r in rows:
        assert r["full_s"] > 0 and r["pruned_s"] > 0 and 0 <= r["selection"] < 1
        assert 1.1 < r["macs_ratio"] < 2.5  # 4 of 12 steps prune; fixed costs are large at tiny shapes
