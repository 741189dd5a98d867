"""The evaluation store: a resumed, corrupted or shared run ends with the table a clean run gives.

Every scenario runs ``catlab.evaluate`` on a one-layer tiny SD3 (16×16, 4 steps, 3 of
the embedded model's held-out captions, batches of 2) and compares its table with a
clean run of the same settings in an empty directory: the quality and MACs columns
must be equal exactly, and every speed-up must be the ratio of timings that one
process took on the same batches.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.conftest import ROOT

BASE = [
    "model=tiny_sd3",
    "model.num_layers=1",
    "model.height=16",
    "model.width=16",
    "sampler.num_steps=4",
    "+strategy_defaults.start_step=2",
    "strategies=[full,random]",
    "batch_size=2",
    "prompts=embedded_heldout",
    "prompts.n=12",
    "num_prompts=3",
    "metrics=[psnr,ssim]",
    "diagnostics=false",
    "save_images=false",
    "logger=local",
    "warmup=false",
    "threads=1",
]


def evaluate(out: Path, cache: Path, *overrides: str) -> list[dict]:
    """``python -m catlab.evaluate`` in this process, into ``out``."""
    from hydra import compose, initialize_config_dir

    from catlab.evaluate import run

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=[*BASE, f"cache_dir={cache}", *overrides])
    out.mkdir(parents=True, exist_ok=True)
    return run(cfg, out)


def table(out: Path) -> list[tuple]:
    """The quality and MACs columns of a run's table."""
    rows = json.loads((out / "results.json").read_text())
    return [
        (
            r["method"],
            r["alpha"],
            r["num_images"],
            r["macs_per_image"],
            r["macs_ratio"],
            r.get("psnr"),
            r.get("ssim"),
            r.get("incomplete"),
        )
        for r in rows
    ]


def timings(out: Path, key: str) -> dict[tuple[str, str], float]:
    found = {}
    for p in (out / "store" / key / "timings").glob("*.json"):
        t = json.loads(p.read_text())
        found[(t["batch"], t["process"])] = t["seconds"]
    return found


def check_speedups(out: Path) -> dict[str, set[str]]:
    """Every speed-up is full / strategy over batches both were timed on by one process; returns their processes."""
    rows = json.loads((out / "results.json").read_text())
    plan = json.loads((out / "evaluation.json").read_text())
    full = timings(out, rows[0]["key"])
    processes = {}
    for r in rows[1:]:
        mine = timings(out, r["key"])
        pairs = [bp for bp in mine if bp in full and bp[0] in plan["batches"]]
        assert pairs, f"{r['method']}: no same-process pair"
        assert r["speedup"] == pytest.approx(sum(full[bp] for bp in pairs) / sum(mine[bp] for bp in pairs))
        processes[r["method"]] = {p for _, p in pairs}
    return processes


def ignored_note(out: Path) -> int:
    """The count in the table's "N records from another configuration ignored" line (0 if absent)."""
    for line in (out / "results.md").read_text().splitlines():
        if "records from another configuration ignored" in line:
            return int(line.split()[0])
    return 0


def records(out: Path) -> list[Path]:
    return sorted((out / "store").glob("*/p*.json"))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, Path]:
    """(a clean run of BASE, the reference cache every run here shares)."""
    root = tmp_path_factory.mktemp("store")
    evaluate(root / "base", root / "cache")
    return root / "base", root / "cache"


@pytest.mark.parametrize(
    "change",
    [["prompts.seed=5"], ["num_prompts=2"], ["seeds=[0,1]"], ["subset_seed=3"], ["+strategy_defaults.alpha=0.5"]],
    ids=["prompts.seed", "num_prompts", "seeds", "subset_seed", "strategy_setting"],
)
def test_resume_after_a_changed_setting_equals_a_clean_run(tmp_path, base, change):
    base_dir, cache = base
    resumed = tmp_path / "resumed"
    shutil.copytree(base_dir, resumed)
    before = len(records(resumed))
    evaluate(resumed, cache, *change)
    evaluate(tmp_path / "clean", cache, *change)
    assert table(resumed) == table(tmp_path / "clean")
    # records of the first settings stay in the store, out of the table, counted in one line
    used = sum(r[2] for r in table(resumed))
    assert ignored_note(resumed) == len(records(resumed)) - used > 0
    assert len(records(resumed)) - used <= before
    processes = check_speedups(resumed)
    if change == ["+strategy_defaults.alpha=0.5"]:
        # the full model's records are the first run's, yet the new strategy's speed-up compares it with a full
        # model this process timed again (retime_batches=2, 2 batches), never with the first run's timings
        plan = json.loads((resumed / "evaluation.json").read_text())
        first = {
            json.loads(p.read_text())["process"]
            for p in (resumed / "store" / plan["strategies"][0]["key"]).glob("p*.json")
        }
        assert processes["random"].isdisjoint(first) and len(processes["random"]) == 1


def test_without_retiming_the_speedup_is_a_dash_with_its_reason(tmp_path, base):
    base_dir, cache = base
    shutil.copytree(base_dir, tmp_path / "run")
    evaluate(tmp_path / "run", cache, "+strategy_defaults.alpha=0.5", "retime_batches=0")
    rows = json.loads((tmp_path / "run" / "results.json").read_text())
    assert rows[1]["speedup"] is None and rows[1]["speedup_batches"] == 0
    md = (tmp_path / "run" / "results.md").read_text()
    assert "| random | 0.50 | 4 |" in md and " – |" in next(
        line for line in md.splitlines() if line.startswith("| random")
    )
    assert "Speed-up –: random: no batch was timed beside the full model in one process" in md


def _corrupt(path: Path, how: str) -> None:
    if how == "truncated":
        path.write_text(path.read_text()[:40])
    elif how == "garbage":
        path.write_bytes(b"\x00\xffnot json at all")
    else:
        record = json.loads(path.read_text())
        del record["metrics"]
        path.write_text(json.dumps(record))


def test_a_corrupted_record_is_named_set_aside_and_recomputed(tmp_path, base, caplog):
    from catlab.evaluation.store import check_record

    base_dir, cache = base
    out = tmp_path / "run"
    shutil.copytree(base_dir, out)
    files = records(out)
    bad = {files[0]: "truncated", files[3]: "garbage", files[4]: "missing key"}
    for path, how in bad.items():
        _corrupt(path, how)
    # a temporary file left by a killed writer (a process that no longer exists) is cleaned up
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = files[1].with_name(f".{files[1].name}.{socket.gethostname().replace('.', '_')}.{gone.stdout.strip()}.tmp")
    stale.write_text("{")
    with caplog.at_level(logging.INFO, logger="catlab"):
        evaluate(out, cache)
    warnings = [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "bad store record" in r.getMessage()
    ]
    assert len(warnings) == len(bad)
    for path in bad:
        line = next(w for w in warnings if str(path) in w)
        assert "recomputed" in line and "\n" not in line
        assert (out / "store" / "rejected" / path.parent.name / path.name).exists()  # set aside, not deleted
        check_record(path, json.loads(path.read_text()))  # and written again
    assert not stale.exists()
    assert table(out) == table(base_dir)
    check_speedups(out)


def test_merge_validates_records_the_same_way(tmp_path, base, caplog):
    from catlab.evaluation import merge

    base_dir, cache = base
    out = tmp_path / "run"
    shutil.copytree(base_dir, out)
    victim = records(out)[-1]
    _corrupt(victim, "garbage")
    merge.main([str(out)])
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and f"bad store record {victim}" in warned[0]
    assert warned[0].endswith("rerun the evaluation to recompute it")
    assert (out / "store" / "rejected" / victim.parent.name / victim.name).exists()
    assert [r[7] for r in table(out)].count("2/3") == 1  # the row that lost a record says so
    evaluate(out, cache)  # the rerun recomputes it
    assert table(out) == table(base_dir)


def test_merge_without_a_manifest_is_one_line(tmp_path):
    from catlab.evaluation import merge

    with pytest.raises(SystemExit) as stop:
        merge.main([str(tmp_path)])
    message = str(stop.value.code)
    assert message.startswith("catlab: cannot merge") and "\n" not in message and "evaluation.json" in message


def test_a_batch_another_live_process_holds_is_waited_for_then_taken_over(tmp_path, base):
    """A claim by a live process is honoured (the batch is not computed twice); once that process is gone
    without finishing, the batch is taken over."""
    from catlab.evaluation.store import _started

    base_dir, cache = base
    out = tmp_path / "run"
    plan = json.loads((base_dir / "evaluation.json").read_text())
    first = next(iter(plan["batches"]))
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3)"])
    threading.Thread(target=holder.wait, daemon=True).start()  # reaped when it ends, as an unrelated process is
    try:
        (out / "store" / "claims").mkdir(parents=True)
        (out / "store" / "claims" / f"{first}.claim").write_text(
            json.dumps(
                {
                    "host": socket.gethostname().replace(".", "_"),
                    "pid": holder.pid,
                    "started": _started(holder.pid),
                    "process": "elsewhere",
                }
            )
        )
        evaluate(out, cache)
        assert holder.poll() is not None  # it waited for the holder before computing the batch
    finally:
        holder.kill()
    assert table(out) == table(base_dir)
    assert not list((out / "store" / "claims").iterdir())


#: runs catlab.evaluate in a process that either SIGKILLs itself halfway through writing its Nth record
#: ("kill N"), or waits for a partner at a barrier and takes its time over each batch ("together DIR")
WRAPPER = """
import os, runpy, signal, sys, time
from pathlib import Path
import catlab.evaluate
import catlab.evaluation.harness as harness
import catlab.evaluation.store as store
mode, arg = sys.argv.pop(1), sys.argv.pop(1)
if mode == "kill":
    left, write = int(arg), store._atomic_write
    def write_then_die(path, obj):
        global left
        if path.name.startswith("p"):
            left -= 1
            if left == 0:
                path.with_name(f".{path.name}.{store._host()}.{os.getpid()}.tmp").write_text('{"half')
                os.kill(os.getpid(), signal.SIGKILL)
        write(path, obj)
    store._atomic_write = write_then_die
else:
    barrier = Path(arg)
    (barrier / str(os.getpid())).touch()
    while len(list(barrier.iterdir())) < 2:
        time.sleep(0.01)
    compute = harness._Run.compute
    def slow(self, *args):
        time.sleep(0.3)
        return compute(self, *args)
    harness._Run.compute = slow
runpy.run_module("catlab.evaluate", run_name="__main__", alter_sys=True)
"""


def _launch(out: Path, cache: Path, mode: str, arg: str, *overrides: str) -> subprocess.Popen:
    cmd = [sys.executable, "-c", WRAPPER, mode, arg, f"hydra.run.dir={out}", *BASE, f"cache_dir={cache}", *overrides]
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


@pytest.mark.slow
def test_kill_9_mid_write_then_resume_gives_the_clean_table(tmp_path, base):
    base_dir, cache = base
    out = tmp_path / "run"
    proc = _launch(out, cache, "kill", "3")
    proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL
    assert len(records(out)) == 2 and list((out / "store").glob("*/.*.tmp"))
    assert list((out / "store" / "claims").iterdir())  # the dead process's claim is still there
    evaluate(out, cache)
    assert table(out) == table(base_dir)
    assert not list((out / "store").glob("**/.*.tmp")) and not list((out / "store" / "claims").iterdir())
    check_speedups(out)


@pytest.mark.slow
def test_two_evaluations_started_together_share_the_work(tmp_path, base):
    base_dir, cache = base
    out, barrier = tmp_path / "run", tmp_path / "barrier"
    barrier.mkdir()
    both = ["num_prompts=6", "batch_size=1"]
    procs = [_launch(out, cache, "together", str(barrier), *both) for _ in range(2)]
    for p in procs:
        log = p.communicate(timeout=600)[0]
        assert p.returncode == 0, log[-3000:]
    evaluate(tmp_path / "clean", cache, *both)
    assert table(out) == table(tmp_path / "clean")
    plan = json.loads((out / "evaluation.json").read_text())
    for s in plan["strategies"]:
        timed = timings(out, s["key"])
        # every batch generated once, by one of the two processes (each also ran its own warm-up: off here)
        assert sorted(b for b, _ in timed) == sorted(plan["batches"])
    assert len(records(out)) == 2 * 6
    check_speedups(out)
