"""Bad inputs and hostile actions through the real command lines and API: one ``catlab:`` line, nothing left behind.

Each case of :data:`CASES` runs ``catlab.run``, ``catlab.evaluate`` or ``catlab.sweep``
in this process, through the same ``main(argv)`` that ``python -m`` calls (the
``slow`` subprocess tests at the end check that the two agree), and asserts:
the exit code; exactly one line starting ``catlab:`` on stderr, holding the
expected words; no traceback; and no folder or file left that the command
made (only a success, or a sweep's job records, may leave its outputs).

Folders that cannot be written are simulated by failing every write under them
with the errno a read-only folder (EACCES) or a full disk (ENOSPC) gives, at the
level of ``os`` and ``open`` that every writer goes through (the tests may run as
root, whom permission bits do not stop). A full disk creates the file and fails
its bytes, as a real one does.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from catlab.selection.simple import Random
from tests.conftest import ROOT, run_cli

RUN = (
    "logger=local",
    "sampler.num_steps=4",
    "sampler.progress=false",
    "selector.start_step=2",
    "num_images=1",
    "threads=1",
    "hydra.run.dir={tmp}/run",
    "hydra.sweep.dir={tmp}/sweep",
)
EVAL = (
    "model=tiny_sd3",
    "model.num_layers=1",
    "model.height=16",
    "model.width=16",
    "sampler.num_steps=4",
    "++strategy_defaults.start_step=2",
    "num_prompts=1",
    "metrics=[psnr]",
    "diagnostics=false",
    "save_images=false",
    "warmup=false",
    "logger=local",
    "threads=1",
    "cache_dir={tmp}/cache",
    "hydra.run.dir={tmp}/eval",
)
TINY = ("model=tiny_sd3", "model.num_layers=1", "model.height=16", "model.width=16")


# -- hostile conditions ---------------------------------------------------------------------------------------------


class FailingWrites:
    """Every write under ``root`` whose path contains ``match`` fails with ``code`` (EACCES read-only, ENOSPC full)."""

    def __init__(self, monkeypatch, root: Path, code: int, match: str = ""):
        self.root, self.code, self.match = Path(root).resolve(), code, match
        self.fds: set[int] = set()
        real_open, real_os_open, real_write = builtins.open, os.open, os.write
        real_mkdir, real_replace, real_rename = os.mkdir, os.replace, os.rename

        def hit(path) -> bool:
            try:
                p = Path(os.fspath(path)).resolve()
            except TypeError:
                return False
            return (p == self.root or self.root in p.parents) and self.match in str(p)

        def error(path):
            return OSError(self.code, os.strerror(self.code), os.fspath(path))

        def writing(mode: str) -> bool:
            return any(c in mode for c in "wax+")

        def patched_open(file, mode="r", *args, **kwargs):
            if not isinstance(file, int) and writing(mode) and hit(file):
                if self.code != errno.ENOSPC:
                    raise error(file)
                return _FullFile(real_open(file, mode, *args, **kwargs), file, self.code)
            return real_open(file, mode, *args, **kwargs)

        def patched_os_open(path, flags, *args, **kwargs):
            wants_write = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            if wants_write and hit(path):
                if self.code != errno.ENOSPC:
                    raise error(path)
                fd = real_os_open(path, flags, *args, **kwargs)
                self.fds.add(fd)
                return fd
            return real_os_open(path, flags, *args, **kwargs)

        def patched_write(fd, data):
            if fd in self.fds:
                raise OSError(self.code, os.strerror(self.code))
            return real_write(fd, data)

        def patched_mkdir(path, *args, **kwargs):
            if hit(path) and self.code != errno.ENOSPC:
                raise error(path)
            return real_mkdir(path, *args, **kwargs)

        def patched_replace(src, dst, *args, **kwargs):
            if hit(dst) and self.code != errno.ENOSPC:
                raise error(dst)
            return real_replace(src, dst, *args, **kwargs)

        for target, name, value in (
            (builtins, "open", patched_open),
            (io, "open", patched_open),
            (os, "open", patched_os_open),
            (os, "write", patched_write),
            (os, "mkdir", patched_mkdir),
            (os, "replace", patched_replace),
            (os, "rename", patched_replace),
        ):
            monkeypatch.setattr(target, name, value)
        del real_rename


class _FullFile:
    """A file opened on a full disk: it exists, and any byte written fails."""

    def __init__(self, f, path, code):
        self._f, self._path, self._code = f, path, code

    def write(self, data):
        raise OSError(self._code, os.strerror(self._code), os.fspath(self._path))

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def read_only(sub: str, make: bool = True):
    def setup(tmp: Path, monkeypatch):
        if make:
            (tmp / sub).mkdir(parents=True, exist_ok=True)
        FailingWrites(monkeypatch, tmp / sub, errno.EACCES)

    return setup


def disk_full(sub: str, match: str = ""):
    def setup(tmp: Path, monkeypatch):
        FailingWrites(monkeypatch, tmp / sub, errno.ENOSPC, match)

    return setup


def a_file(sub: str):
    def setup(tmp: Path, monkeypatch):
        (tmp / sub).write_text("a file, not a folder\n")

    return setup


def prompts_file(text: str):
    def setup(tmp: Path, monkeypatch):
        (tmp / "prompts.txt").write_text(text)

    return setup


# -- selectors that break the index contract -----------------------------------------------------------------------


def _short(idx, n):
    return idx[:, :-1]


def _long(idx, n):
    return torch.cat([idx, idx[:, :3]], dim=1)


def _repeated(idx, n):
    idx = idx.clone()
    idx[:, 1] = idx[:, 0]
    return idx


def _floats(idx, n):
    return idx.float()


def _flat(idx, n):
    return idx[0]


def _beyond(idx, n):
    idx = idx.clone()
    idx[:, 0] = n
    return idx


def _negative(idx, n):
    idx = idx.clone()
    idx[:, 0] = -1
    return idx


def _a_list(idx, n):
    return idx.tolist()


BROKEN = {  # name: (how the indices are broken, words of the error)
    "short": (_short, "returned shape"),
    "long": (_long, "returned shape"),
    "repeated": (_repeated, "twice"),
    "floats": (_floats, "torch.float32 indices"),
    "flat": (_flat, "returned shape"),
    "beyond": (_beyond, "tokens are [0,"),
    "negative": (_negative, "tokens are [0,"),
    "a_list": (_a_list, "returned list"),
}


def broken_selector(kind: str):
    """A Random selector (same config keys) whose indices are broken the way ``kind`` says."""
    breaks = BROKEN[kind][0]

    class Broken(Random):
        name = f"broken_{kind}"

        def select(self, state):
            return breaks(super().select(state), state.grid[0] * state.grid[1])

    Broken.__name__ = f"Broken_{kind}"
    return Broken


@pytest.fixture
def broken_registered():
    """``selector.name=broken_<kind>`` works in the command line for the test's duration."""
    from catlab.registry import selectors

    names = []
    for kind in BROKEN:
        cls = broken_selector(kind)
        selectors._entries[cls.name] = cls
        cls.registered_name = cls.name
        names.append(cls.name)
    yield
    for name in names:
        selectors._entries.pop(name, None)


# -- the table -------------------------------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    argv: tuple[str, ...]
    #: words of the one ``catlab:`` line (None: the command succeeds and prints none)
    line: str | None
    app: str = "run"
    setup: Callable | None = None
    code: int = 1
    #: what the command may leave under the test folder (a success's outputs, a sweep's job records)
    keeps: tuple[str, ...] = ()
    check: Callable | None = None


def _unguided_once(tmp, err):
    assert err.count("unguided") == 1


def _one_prompt_and_a_warning(tmp, err):
    assert "dropped control characters from 1 line(s)" in err
    assert len(list((tmp / "run" / "images").glob("*.png"))) == 1  # "a\x0bb" is one prompt, not two


def _failed_row(tmp, err):
    summary = (tmp / "sweep" / "summary.md").read_text()
    assert "failed: catlab:" in summary and "| done |" in summary
    failed = json.loads((tmp / "sweep" / "0" / "failed.json").read_text())
    assert failed["error"].startswith("catlab: ")
    code, out, err2 = _call("sweep", [str(tmp / "sweep")])
    assert code == 1 and "failed" in out and "unfinished" not in out
    assert [ln for ln in err2.splitlines() if ln.startswith("catlab:")] == [err2.strip()]


def _no_tmp_left(tmp, err):
    assert not list(tmp.rglob("*.tmp"))


CASES = [
    # -- config typos: the key, the nearest valid one, and the keys there are
    Case(
        "typo in a selector key",
        ("selector.alpah=0.3",),
        "catlab: unknown key 'selector.alpah' (did you mean 'selector.alpha'?); keys of selector=cat: name, alpha",
    ),
    Case(
        "typo in a sampler key",
        ("sampler.steps=1",),
        "unknown key 'sampler.steps' (did you mean 'sampler.num_steps'?); keys of sampler: num_steps",
    ),
    Case("unknown top-level key", ("foo=bar",), "unknown key 'foo'; keys of the config: model, prompts"),
    Case("misspelt group", ("selektor=random",), "unknown key 'selektor' (did you mean 'selector'?)"),
    Case("appended unknown top-level key", ("+foo=1",), "unknown key 'foo'; keys of the config"),
    Case(
        "typo in a clusterer key",
        ("clusterer.num_cluster=3",),
        "(did you mean 'clusterer.num_clusters'?); keys of clusterer=auto",
    ),
    Case(
        "typo under another selector",
        ("selector=random", "selector.alpah=0.3"),
        "keys of selector=random: name, alpha, start_step, seed",
    ),
    Case(
        "appended key the selector lacks",
        ("selector=random", "+selector.alpah=0.3"),
        "selector 'random' has no config key(s) ['alpah']; allowed: ['alpha', 'seed', 'start_step']",
    ),
    Case("unknown option", ("selector=nope",), "unknown option 'selector=nope' (did you mean 'selector=noise'?)"),
    Case("unknown clusterer option", ("clusterer=kmeanz",), "unknown option 'clusterer=kmeanz' (did you mean"),
    Case("unknown experiment", ("experiment=nope",), "unknown option 'experiment=nope'; options of experiment: "),
    Case("not a number", ("seed=abc",), "could not be converted to Integer"),
    Case("broken override syntax", ("selector.alpha=[",), "catlab: config error: "),
    Case("unknown selector name", ("selector.name=nope",), "unknown selector 'nope'; registered: "),
    Case("unknown model name", ("model.name=unet",), "unknown model 'unet'; registered: "),
    # -- values out of range
    Case("alpha above 1", ("selector.alpha=1.5",), "alpha must be in (0, 1]"),
    Case("alpha 0", ("selector.alpha=0",), "alpha must be in (0, 1]"),
    Case("start_step past the end", ("selector.start_step=4",), "start_step=4 must be < num_steps=4"),
    Case("no steps", ("sampler.num_steps=0",), "sampler.num_steps must be >= 1"),
    Case("batch 0", ("batch_size=0",), "batch_size must be >= 1"),
    Case("no images", ("num_images=0",), "num_images must be >= 1 or null"),
    Case("threads 0", ("threads=0",), "threads must be >= 1"),
    Case("no clusters", ("clusterer.num_clusters=0",), "num_clusters must be >= 1; got 0"),
    Case(
        "more clusters than tokens",
        ("clusterer.num_clusters=100000",),
        "clusterer.num_clusters=100000 is more than the 256 image tokens",
    ),
    Case("500 clusters on 256 tokens", ("clusterer.num_clusters=500",), "is more than the 256 image tokens"),
    Case("odd height", (*TINY, "model.height=33"), "takes sizes that are multiples of 2"),
    Case("odd size 33x31", (*TINY, "model.height=33", "model.width=31"), "got model.height=33, model.width=31"),
    Case("size 16x15", (*TINY, "model.width=15"), "multiples of 2 (VAE scale 1 x patch 2)"),
    Case("size below one patch", (*TINY, "model.height=1", "model.width=1"), "model 'tiny_sd3' could not be built"),
    Case(
        "embedded without its size key",
        ("model.height=64",),
        "key 'model.height' is not in the config file of model=embedded (the component takes it)",
    ),
    Case("embedded at another size", ("+model.height=64",), "the embedded model generates 32x32 images"),
    Case("negative seed", ("seed=-1",), "seed -1 is outside [0, 2^63)"),
    Case("seed 2^64", ("seed=18446744073709551616",), "is outside [0, 2^63)"),
    Case("seed 2^64 - 1", ("seed=18446744073709551615",), "is outside [0, 2^63)"),
    Case(
        "last image's seed past 2^63",
        ("seed=9223372036854775807", "num_images=2"),
        "seed 9223372036854775808 is outside",
    ),
    Case("in-step selector with a reuse rule", ("selector=atedm", "reuse=taylor"), "prunes inside each step"),
    Case(
        "step cache of another length",
        ("selector=full", "stepcache=taylorseer", "+stepcache.num_steps=5"),
        "stepcache 'taylorseer' has no config key(s) ['num_steps']",
    ),
    Case("model on a missing GPU", ("model.device=cuda",), "could not be built"),
    Case("unknown dtype", ("model.dtype=float13",), "could not be built"),
    # -- prompts files
    Case("missing prompts file", ("prompts=file", "prompts.path={tmp}/nope.txt"), "prompts.path: no such file"),
    Case(
        "empty prompts file",
        ("prompts=file", "prompts.path={tmp}/prompts.txt"),
        "holds no prompts",
        setup=prompts_file("\n  \n# only a comment\n"),
    ),
    Case(
        "prompts file not UTF-8",
        ("prompts=file", "prompts.path={tmp}/prompts.txt"),
        "catlab: config error: ",
        setup=lambda tmp, mp: (tmp / "prompts.txt").write_bytes(b"\xff\xfe a red \xff circle\n"),
    ),
    Case(
        "vertical tab in a prompt",
        ("prompts=file", "prompts.path={tmp}/prompts.txt", "num_images=null"),
        None,
        setup=prompts_file("a small red\x0bcircle\n"),
        code=0,
        keeps=("run",),
        check=_one_prompt_and_a_warning,
    ),
    Case(
        "guidance 0 runs unguided, said once",
        ("sampler.guidance_scale=0",),
        None,
        code=0,
        keeps=("run",),
        check=_unguided_once,
    ),
    Case(
        "negative guidance runs unguided, said once",
        ("sampler.guidance_scale=-5",),
        None,
        code=0,
        keeps=("run",),
        check=_unguided_once,
    ),
    # -- folders that cannot be written
    Case("run dir under a file", ("hydra.run.dir={tmp}/afile/run",), "catlab: cannot write ", setup=a_file("afile")),
    Case("read-only run dir", (), "cannot write {tmp}/run/run.log: Permission denied", setup=read_only("run")),
    Case(
        "run dir in a read-only folder",
        ("hydra.run.dir={tmp}/ro/run",),
        "cannot write {tmp}/ro/run: Permission denied",
        setup=read_only("ro"),
    ),
    Case(
        "disk full before the run",
        ("hydra.run.dir={tmp}/full/run",),
        "No space left on device",
        setup=disk_full("full", match="catlab-probe"),
    ),
    Case(
        "disk full at the end of the run",
        (),
        "cannot write {tmp}/run/metrics.json.tmp: No space left on device",
        setup=disk_full("run", match="metrics.json"),
        check=_no_tmp_left,
    ),
    Case(
        "sweep dir under a file",
        ("-m", "hydra.sweep.dir={tmp}/afile/sweep", "selector=full,random"),
        "catlab: cannot write ",
        setup=a_file("afile"),
    ),
    # -- broken selectors (a plugin's bug): the selector, the step and what was wrong
    Case(
        "selector returns k-1 tokens",
        ("selector=random", "selector.name=broken_short"),
        "catlab: selector 'broken_short' at step 3 returned shape (1, ",
    ),
    Case(
        "selector returns floats", ("selector=random", "selector.name=broken_floats"), "returned torch.float32 indices"
    ),
    Case("selector repeats a token", ("selector=random", "selector.name=broken_repeated"), "a token twice"),
    # -- sweeps: a job failing at run time is a failed row, the sweep exits non-zero
    Case(
        "sweep job failing at run time",
        ("-m", "selector=random", "selector.name=broken_short,random"),
        "catlab: 1 of 2 sweep jobs failed (jobs 0)",
        keeps=("sweep",),
        check=_failed_row,
    ),
    Case(
        "sweep job refused",
        ("-m", *TINY, "selector=random", "model.height=33,16"),
        "catlab: 1 of 2 sweep jobs failed (jobs 0)",
        keeps=("sweep",),
        check=_failed_row,
    ),
    Case("summary of no sweep", ("{tmp}/nowhere",), "catlab: no sweep directory", app="sweep", code=2),
    # -- catlab.evaluate
    Case(
        "evaluate: typo",
        ("strategy_default.alpha=0.5",),
        "unknown key 'strategy_default' (did you mean 'strategy_defaults'?); keys of the config: ",
        app="evaluate",
    ),
    Case(
        "evaluate: typo in a model key",
        ("model.num_layer=1",),
        "unknown key 'model.num_layer' (did you mean 'model.num_layers'?); keys of model=tiny_sd3",
        app="evaluate",
    ),
    Case("evaluate: unknown model option", ("model=nope",), "unknown option 'model=nope'", app="evaluate"),
    Case("evaluate: unknown metric", ("metrics=[psnr,nope]",), "unknown metric 'nope'", app="evaluate"),
    Case("evaluate: negative seed", ("seeds=[0,-1]",), "seeds: seed -1 is outside [0, 2^63)", app="evaluate"),
    Case("evaluate: odd size", ("model.height=15",), "multiples of 2", app="evaluate"),
    Case(
        "evaluate: a strategy without a name",
        ("strategies=[{{selector: cat}}]",),
        "strategies[0] must be a selector name or a mapping with a 'name' key",
        app="evaluate",
    ),
    Case(
        "evaluate: a model the strategy cannot prune",
        ("model=tiny_pixart", "strategies=[atedm]"),
        "config error: selector atedm prunes inside SD3-family transformers",
        app="evaluate",
    ),
    Case(
        "evaluate: read-only cache",
        (),
        "cannot write {tmp}/cache: Permission denied",
        app="evaluate",
        setup=read_only("cache", make=False),
    ),
    Case(
        "evaluate: store under a file",
        ("store_dir={tmp}/afile/store",),
        "cannot write {tmp}/afile: Not a directory",
        app="evaluate",
        setup=a_file("afile"),
    ),
]


def _call(app: str, argv: list[str]) -> tuple[int, str, str]:
    """Run an app's ``main(argv)`` here; (exit code, stdout, stderr)."""
    import contextlib

    from catlab import evaluate, run, sweep

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            if app == "sweep":
                code = sweep.main(argv)
            else:
                (run if app == "run" else evaluate).main(argv)
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def _tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input(case: Case, tmp_path, monkeypatch, broken_registered):
    if case.id == "model on a missing GPU" and torch.cuda.is_available():
        pytest.skip("a GPU is here")
    monkeypatch.chdir(ROOT)
    tmp = tmp_path
    (tmp / "marker").write_text("")  # the test folder is not the command's to remove
    if case.setup is not None:
        case.setup(tmp, monkeypatch)
    before = _tree(tmp)
    base = {"run": RUN, "evaluate": EVAL, "sweep": ()}[case.app]
    argv = [a.format(tmp=tmp) for a in (*base, *case.argv)]
    argv = [a for a in argv if a.startswith("-")] + [a for a in argv if not a.startswith("-")]
    code, out, err = _call(case.app, argv)
    monkeypatch.undo()  # writes work again, for the checks
    lines = [ln for ln in err.splitlines() if ln.startswith("catlab:")]
    assert code == case.code, err[-2000:]
    assert "Traceback" not in err and "Traceback" not in out
    if case.line is None:
        assert lines == [], err[-2000:]
    else:
        assert len(lines) == 1, err[-2000:]
        assert case.line.format(tmp=tmp) in lines[0]
    left = {p for p in _tree(tmp) - before if not any(p == k or p.startswith(k + "/") for k in case.keeps)}
    assert not left, f"left behind: {sorted(left)}"
    if case.check is not None:
        case.check(tmp, out + err)  # catlab's log lines go to stdout (Hydra's console handler)


def test_the_table_holds_forty_cases():
    assert len(CASES) >= 40


# -- the index contract in every loop ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_the_sampler_names_a_selector_that_breaks_the_contract(kind):
    from catlab.planner import IndexContractError
    from catlab.sampler import SamplerConfig, sample
    from tests.conftest import tiny_sd3

    policy = broken_selector(kind)(start_step=1)
    with pytest.raises(IndexContractError, match=f"selector 'broken_{kind}' at step 2 .*{re.escape(BROKEN[kind][1])}"):
        sample(
            tiny_sd3(num_layers=1),
            policy,
            ["a red circle", "a blue square"],
            [0, 1],
            SamplerConfig(num_steps=3, progress=False),
        )


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_enable_pruning_names_a_selector_that_breaks_the_contract(kind):
    from catlab import disable_pruning, enable_pruning
    from catlab.planner import IndexContractError
    from tests.test_diffusers_hooks import _sd3

    pipe, call = _sd3()
    enable_pruning(pipe, broken_selector(kind)(start_step=1))
    try:
        with pytest.raises(
            IndexContractError, match=f"selector 'broken_{kind}' at step 2 .*{re.escape(BROKEN[kind][1])}"
        ):
            call()
    finally:
        disable_pruning(pipe)


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_check_policy_fails_a_selector_that_breaks_the_contract(kind):
    from catlab.planner import IndexContractError
    from catlab.pruning.sync_check import HostSyncError
    from catlab.testing import check_policy

    # a list can only be made by reading the device: the host-sync guard names it first
    error, words = (
        (HostSyncError, "broken_a_list at step 2")
        if kind == "a_list"
        else (IndexContractError, f"selector 'broken_{kind}'.*{re.escape(BROKEN[kind][1])}")
    )
    with pytest.raises(error, match=words):
        check_policy(broken_selector(kind)(start_step=1))


def test_the_contract_is_checked_at_every_pruned_step_on_a_cpu():
    """On a CPU every pruned step's indices are checked on the host (no sync to avoid there)."""
    from catlab.planner import IndexContractError
    from catlab.testing import simulate

    class LateBreak(Random):
        name = "late_break"

        def select(self, state):
            idx = super().select(state)
            return idx[:, :-1] if state.step == 4 else idx

    for check in (False, True):
        with pytest.raises(IndexContractError, match="late_break' at step 4"):  # broken at its 3rd pruned step
            simulate(LateBreak(start_step=1), grid=(4, 4), num_steps=6, check_indices=check)


def test_check_policy_defaults_work_with_every_selectors_default_start_step():
    from catlab.registry import selectors
    from catlab.testing import check_policy

    for name in ("cat", "random", "noise", "sequential"):
        policy = selectors.build(name)
        assert check_policy(policy, skip_first_pruned=name == "cat") >= 1, name


def test_enable_pruning_refuses_a_name_or_anything_not_a_selector():
    from catlab import enable_pruning
    from tests.test_diffusers_hooks import _sd3

    pipe, _ = _sd3()
    with pytest.raises(TypeError, match=r"enable_pruning takes a selector .*catlab.selectors.build\('cat'\)"):
        enable_pruning(pipe, "cat")
    with pytest.raises(TypeError, match="got dict"):
        enable_pruning(pipe, {"name": "cat"})
    assert getattr(pipe.transformer, "_catlab_pruner", None) is None


# -- numbers that say what they are --------------------------------------------------------------------------------


def test_selection_share_leaves_the_warm_up_out():
    """The first pruned step carries one-time costs; ``selection_share`` leaves it out, the rest says it apart."""
    from catlab.metrics.cost import cost_metrics
    from catlab.sampler import StepRecord, Trace

    steps = [StepRecord(1, 16, 100, 0, 1.0, 0.0), StepRecord(2, 4, 30, 1, 1.5, 0.9), StepRecord(3, 4, 30, 1, 1.0, 0.1)]
    m = cost_metrics(
        [Trace(num_tokens=16, grid=(4, 4), batch_size=1, full_step_macs=100, steps=steps, seconds=3.5)], 3.5
    )
    assert m["selection_share"] == pytest.approx(0.1 / 2.0)
    assert m["selection_share_with_warmup"] == pytest.approx(1.0 / 3.5)
    assert m["selection_warmup_seconds"] == pytest.approx(0.9)


def test_random_weight_models_say_so():
    from catlab.models.embedded import Embedded
    from tests.conftest import tiny_pixart, tiny_sd3

    assert tiny_sd3().random_weights and tiny_pixart().random_weights and not Embedded.random_weights


def test_evaluate_defaults_to_the_embedded_model():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        assert compose(config_name="evaluate").model.name == "embedded"


# -- the same through real processes -------------------------------------------------------------------------------


def _one_line(proc) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("catlab:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return lines[0]


@pytest.mark.slow
def test_a_typo_through_python_m(tmp_path):
    proc, run_dir = run_cli("selector.alpah=0.3", "logger=local", tmp_path=tmp_path, check=False)
    assert proc.returncode == 1 and not run_dir.exists()
    assert _one_line(proc).startswith("catlab: unknown key 'selector.alpah' (did you mean 'selector.alpha'?)")
    assert "+selector" not in proc.stderr


@pytest.mark.slow
def test_a_run_dir_under_a_file_through_python_m(tmp_path):
    (tmp_path / "afile").write_text("")
    proc, _ = run_cli("logger=local", f"hydra.run.dir={tmp_path / 'afile' / 'run'}", tmp_path=tmp_path, check=False)
    assert proc.returncode == 1
    assert _one_line(proc) == f"catlab: cannot write {tmp_path / 'afile' / 'run'}: Not a directory"


@pytest.mark.slow
def test_a_sweep_with_a_job_failing_at_run_time_through_python_m(tmp_path):
    proc, _ = run_cli(
        "-m",
        *TINY,
        "selector=random",
        "selector.start_step=1",
        "sampler.num_steps=3",
        "num_images=1",
        "logger=local",
        "sampler.progress=false",
        "model.height=33,16",
        tmp_path=tmp_path,
        check=False,
    )
    assert proc.returncode == 1 and _one_line(proc).startswith("catlab: 1 of 2 sweep jobs failed (jobs 0)")
    summary = subprocess_sweep(tmp_path / "sweep")
    assert summary.returncode == 1 and "failed: catlab: config error: model 'tiny_sd3' takes sizes" in summary.stdout


def subprocess_sweep(folder: Path):
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "catlab.sweep", str(folder)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


# -- the command line: folders it did not make, Ctrl-C, values checked before compute, sweeps ----------------------

RUN_HERE = tuple(a for a in RUN if not a.startswith("hydra."))


def _listing(folder: Path) -> dict[str, bytes | None]:
    """Every entry under ``folder`` with its bytes (None: a folder): what "left as it was" compares."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


def _only_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("catlab:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


@pytest.mark.parametrize("where", ["an empty folder", "'.' of an empty folder", "a folder with files", "chdir"])
def test_a_failed_run_leaves_a_folder_it_did_not_make_as_it_was(where, tmp_path, monkeypatch):
    mine = tmp_path / "mine"
    mine.mkdir()
    if where in ("a folder with files", "chdir"):
        (mine / "notes.txt").write_text("my notes\n")
        (mine / "sub").mkdir()
        (mine / "sub" / "data.csv").write_text("1,2\n")
    monkeypatch.chdir(mine if where.startswith("'.'") else ROOT)
    run_dir = "." if where.startswith("'.'") else str(mine)
    chdir = ["hydra.job.chdir=true"] if where == "chdir" else []
    before = _listing(mine)
    code, _, err = _call("run", [*RUN_HERE, "selector.alpha=1.5", f"hydra.run.dir={run_dir}", *chdir])
    assert code == 1
    assert "alpha must be in (0, 1]" in _only_line(err)  # the real error, not a failed clean-up
    assert mine.is_dir() and _listing(mine) == before


def test_a_failed_run_removes_the_folders_it_made_and_no_more(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "old").mkdir()
    code, _, err = _call("run", [*RUN_HERE, "selector.alpha=1.5", "hydra.run.dir=outputs/new/deeper/run"])
    assert code == 1 and "alpha must be in (0, 1]" in _only_line(err)
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["old"]
    (tmp_path / "mine").mkdir()  # an empty folder of the user's above the run folder stays
    code, _, err = _call("run", [*RUN_HERE, "selector.alpha=1.5", "hydra.run.dir=mine/new/run"])
    assert code == 1 and (tmp_path / "mine").is_dir() and not any((tmp_path / "mine").iterdir())


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("existing", [False, True])
def test_ctrl_c_in_a_run_is_one_line_and_leaves_nothing(existing, tmp_path, monkeypatch):
    import catlab.run

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(catlab.run, "generate", _interrupt)
    run_dir = tmp_path / "run"
    if existing:
        run_dir.mkdir()
        (run_dir / "mine.txt").write_text("kept\n")
    before = _listing(tmp_path)
    code, _, err = _call("run", [*RUN_HERE, f"hydra.run.dir={run_dir}"])
    assert code == 130
    assert _only_line(err).startswith("catlab: interrupted; removed ")
    assert _listing(tmp_path) == before  # no partial run folder, no metrics-less images


VALUE_CASES = [  # values that pass a type check and would fail after compute: refused first, naming the key
    Case("start_step 0", ("selector.start_step=0",), "start_step=0 must be >= 1"),
    Case("guidance inf", ("sampler.guidance_scale=inf",), "sampler.guidance_scale must be a finite number"),
    Case("guidance nan", ("sampler.guidance_scale=nan",), "sampler.guidance_scale must be a finite number"),
    Case("alpha a string", ("selector.alpha='0.5'",), "alpha must be a number in (0, 1]"),
    Case("no model", ("~model",), "model is not set; choose one: model=<option> (options of model: "),
    Case("model null", ("model=null",), "model=null gives the model group no option; choose one"),
    Case("selector null", ("selector=null",), "options of selector: "),
    Case("threads beyond the CPUs", ("threads=100000",), "threads must be >= 1 and at most this machine's"),
    Case("prompts file not given", ("prompts=file",), "prompts.path is not set; give the file"),
    Case("prompts file a folder", ("prompts=file", "prompts.path={tmp}"), "is a folder; give a prompts file"),
    Case("prompts file /dev/null", ("prompts=file", "prompts.path=/dev/null"), "is not a regular file"),
    Case("evaluate: no prompts", ("num_prompts=0",), "num_prompts must be >= 1 or null", app="evaluate"),
    Case("evaluate: negative prompts", ("num_prompts=-1",), "num_prompts must be >= 1 or null", app="evaluate"),
    Case("evaluate: no metrics", ("metrics=[]",), "metrics=[] leaves the table without", app="evaluate"),
    Case("evaluate: no strategies", ("strategies=[]",), "compares nothing with the full model", app="evaluate"),
    Case("evaluate: only full", ("strategies=[full]",), "compares nothing with the full model", app="evaluate"),
    Case("evaluate: no seeds", ("seeds=[]",), "seeds=[] gives no images", app="evaluate"),
    Case("evaluate: a seed twice", ("seeds=[0,0]",), "gives seed(s) [0] twice", app="evaluate"),
]


@pytest.mark.parametrize("case", VALUE_CASES, ids=[c.id for c in VALUE_CASES])
def test_a_value_that_would_fail_after_compute_is_refused_first(case: Case, tmp_path, monkeypatch):
    test_hostile_input(case, tmp_path, monkeypatch, None)


def _fake_sweep(folder: Path, task: str, jobs: dict[int, dict[str, str]]) -> Path:
    """A sweep folder as Hydra's basic sweeper leaves it: ``multirun.yaml`` and one folder per job that started,
    each with the files given (name -> text)."""
    folder.mkdir()
    sweeper = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
    (folder / "multirun.yaml").write_text(
        f"hydra:\n  sweeper:\n    _target_: {sweeper}\n    max_batch_size: null\n    params: null\n"
        f"  overrides:\n    task:\n    - {task}\n"
    )
    for i, files in jobs.items():
        (folder / str(i) / ".hydra").mkdir(parents=True)
        (folder / str(i) / ".hydra" / "overrides.yaml").write_text(f"- {task.split(',')[0].split('=')[0]}=job{i}\n")
        for name, text in files.items():
            (folder / str(i) / name).write_text(text)
    return folder


DONE = {"metrics.json": '{"macs_ratio": 1.5}'}


def test_a_sweep_summary_lists_a_job_that_never_ran_and_fails(tmp_path):
    sweep = _fake_sweep(tmp_path / "sweep", "selector=full,random,cat", {0: DONE, 2: DONE})
    code, out, err = _call("sweep", [str(sweep)])
    assert code == 1
    assert _only_line(err).startswith("catlab: 1 of 3 sweep jobs never ran (jobs 1); see ")
    assert "| 1 | `selector=random` | missing |" in out  # named by the overrides it would have had


def test_a_sweep_summary_after_the_last_job_was_killed_before_starting(tmp_path):
    sweep = _fake_sweep(tmp_path / "sweep", "selector=full,random", {0: DONE})
    code, _, err = _call("sweep", [str(sweep)])
    assert code == 1 and "never ran (jobs 1)" in _only_line(err)


@pytest.mark.parametrize(
    "files, status",
    [
        ({".hydra/overrides.yaml": "{[ not: yaml", **DONE}, "| done |"),
        ({".hydra/overrides.yaml": "just a string", **DONE}, "| done |"),
        ({"metrics.json": "[1, 2]"}, "failed: unreadable metrics.json: a JSON list, not an object"),
        ({"metrics.json": "{not json"}, "failed: unreadable metrics.json: JSONDecodeError"),
        ({"failed.json": '["a", "list"]'}, "failed: unreadable failed.json: a JSON list, not an object"),
        ({"failed.json": "7"}, "failed: unreadable failed.json: a JSON int"),
    ],
)
def test_a_sweep_summary_of_garbage_job_files_is_a_row_not_a_traceback(files, status, tmp_path):
    sweep = _fake_sweep(tmp_path / "sweep", "selector=full,random", {0: DONE, 1: {}})
    for name, text in files.items():
        (sweep / "1" / name).write_text(text)
    code, out, err = _call("sweep", [str(sweep)])
    assert "Traceback" not in err and status in out
    assert code == (0 if status == "| done |" else 1)
    if code == 0:
        assert "| 1 | `selector=random` | done |" in out  # the overrides from multirun.yaml
    else:
        assert "of 2 sweep jobs failed (jobs 1)" in _only_line(err)


@pytest.mark.parametrize("what", ["an empty folder", "a folder with files"])
def test_a_sweep_summary_refuses_a_folder_that_is_not_a_sweep(what, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    if what == "a folder with files":
        (folder / "notes.txt").write_text("mine\n")
        (folder / "0").mkdir()  # numbered, but no job of Hydra's
    before = _listing(folder)
    code, _, err = _call("sweep", [str(folder)])
    assert code == 2 and "is not a sweep folder" in _only_line(err)
    assert _listing(folder) == before


def test_a_killed_sweep_worker_is_one_line_and_a_summary(tmp_path, monkeypatch):
    """What joblib raises when a worker process is killed (kill -9, out of memory) stops the sweep where it is:
    the jobs that finished and the ones that never ran are in the summary, and the command says so in one line."""
    from hydra._internal.core_plugins.basic_launcher import BasicLauncher
    from joblib.externals.loky.process_executor import TerminatedWorkerError

    launch = BasicLauncher.launch

    def dies_after_the_first(self, job_overrides, initial_job_idx):
        launch(self, job_overrides[:1], initial_job_idx)
        raise TerminatedWorkerError("A worker process managed by the executor was unexpectedly terminated.")

    monkeypatch.setattr(BasicLauncher, "launch", dies_after_the_first)
    monkeypatch.chdir(ROOT)
    argv = ["-m", *(a.format(tmp=tmp_path) for a in RUN), "selector=full,random"]
    code, _, err = _call("run", argv)
    assert code == 1
    line = _only_line(err)
    assert line.startswith("catlab: a sweep worker process died (A worker process managed by the executor")
    assert line.endswith(f"1 of 2 jobs done, see {tmp_path / 'sweep' / 'summary.md'}")
    summary = (tmp_path / "sweep" / "summary.md").read_text()
    assert "| 0 | `selector=full` | done |" in summary and "| 1 | `selector=random` | missing |" in summary


COMMAND_CASES = [  # a setup or a setting of the other command: the line names the command that takes it
    Case(
        "an evaluation experiment given to catlab.run",
        ("experiment=embedded_table2",),
        "catlab: experiment=embedded_table2 is a setup of the other command; "
        "run python -m catlab.evaluate experiment=embedded_table2",
    ),
    Case(
        "an evaluation setting given to catlab.run",
        ("strategies=[cat]",),
        "'strategies' is a setting of python -m catlab.evaluate, not of python -m catlab.run",
    ),
    Case(
        "a run experiment given to catlab.evaluate",
        ("experiment=embedded_sweep",),
        "run python -m catlab.run experiment=embedded_sweep",
        app="evaluate",
    ),
    Case(
        "a run setting given to catlab.evaluate",
        ("seed=3",),
        "'seed' is a setting of python -m catlab.run, not of python -m catlab.evaluate (did you mean 'seeds'?)",
        app="evaluate",
    ),
    Case(
        "a selector setting given to catlab.evaluate",
        ("selector.alpha=0.3",),
        "(here strategies=[...] and strategy_defaults.<key>=... set the selectors)",
        app="evaluate",
    ),
]


@pytest.mark.parametrize("case", COMMAND_CASES, ids=[c.id for c in COMMAND_CASES])
def test_a_setting_of_the_other_command_names_that_command(case: Case, tmp_path, monkeypatch):
    test_hostile_input(case, tmp_path, monkeypatch, None)


def test_a_folder_named_catlab_that_shadows_the_package_is_one_line(tmp_path, monkeypatch, capsys):
    """``python -m catlab.run`` from a folder holding a ``catlab/`` directory (no ``__init__.py``): the namespace
    package it makes is named in one line and the command exits 1, with no ImportError traceback."""
    import types

    from catlab import registry

    shadow = types.ModuleType("catlab")
    shadow.__path__ = [str(tmp_path / "catlab")]  # what Python makes of a folder without __init__.py
    main = types.ModuleType("__main__")
    main.__spec__ = types.SimpleNamespace(name="catlab.run")
    monkeypatch.setitem(sys.modules, "catlab", shadow)
    monkeypatch.setitem(sys.modules, "__main__", main)
    with pytest.raises(SystemExit) as stop:
        registry._check_not_shadowed()
    assert stop.value.code == 1
    line = _only_line(capsys.readouterr().err)
    assert f"found the folder {tmp_path / 'catlab'}, which is not the catlab package" in line
    main.__spec__ = types.SimpleNamespace(name="my_notebook")  # imported as a library: an ImportError, as before
    with pytest.raises(ImportError, match="Run from another directory"):
        registry._check_not_shadowed()


@pytest.mark.slow
def test_wandb_says_nothing_about_symlinked_files(tmp_path):
    import subprocess

    script = (
        "from pathlib import Path\n"
        "from catlab.loggers.wandb_logger import WandbLogger\n"
        f"d = Path({str(tmp_path)!r})\n"
        "for name in ('config.yaml', 'metrics.json', 'run.log'):\n"
        "    (d / name).write_text('{}')\n"
        "log = WandbLogger()\n"
        "log.start(d, {'a': 1}, 'n')\n"
        "log.finish()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SILENT"}
    env.update(PYTHONPATH=str(ROOT), WANDB_MODE="offline")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Symlinked" not in proc.stderr + proc.stdout
    saved = {p.name for p in tmp_path.glob("wandb/offline-run-*/files/*")}
    assert {"config.yaml", "metrics.json", "run.log"} <= saved


def test_a_write_that_names_no_file_is_named_by_its_folder(tmp_path):
    from catlab.fileio import io_message

    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # os.write on a descriptor: no file name
    assert io_message(full, tmp_path) == f"catlab: cannot write a file in {tmp_path}: No space left on device"


class _FullWriter:
    """torch's C++ archive writer on a full disk: every record fails as torch reports it."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        def fails(*args, **kwargs):
            raise RuntimeError(
                "[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file data/0: "
                "file write failed"
            )

        return fails


def test_a_full_disk_under_torch_save_is_one_line_naming_the_file(tmp_path, monkeypatch):
    """torch's writer fails with a RuntimeError, not an OSError: one line naming where it wrote, nothing left."""
    monkeypatch.setattr(torch._C, "PyTorchFileWriter", _FullWriter)
    monkeypatch.chdir(ROOT)
    (tmp_path / "marker").write_text("")
    code, out, err = _call("evaluate", [a.format(tmp=tmp_path) for a in EVAL])
    monkeypatch.undo()
    line = _only_line(err)
    assert code == 1 and "Traceback" not in out
    # references are serialised in memory and written through Python (a full disk there is an OSError naming the
    # file, tested with the store's cases): a failing torch writer is named by the folders it could have been for
    assert re.match(rf"catlab: cannot write .*{re.escape(str(tmp_path))}.*: the disk may be full ", line)
    assert "PytorchStreamWriter failed writing file data/0" in line
    assert not (tmp_path / "eval").exists()  # the evaluation's folder is gone; the cache holds no half-written image
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.suffix in (".tmp", ".pt")]


FULL_DISK_CASES = [  # each write of a run on a full disk: one line naming the file, and no half-made run folder
    Case("full disk: the run's log", (), "cannot write {tmp}/run/run.log: No space left on device"),
    Case("full disk: an image", (), "cannot write {tmp}/run/images/00000_seed0.png: No space left on device"),
    Case("full disk: Hydra's config", (), "cannot write {tmp}/run/.hydra/config.yaml: No space left on device"),
    Case("full disk: the run's config", (), "cannot write {tmp}/run/config.yaml.tmp: No space left on device"),
    Case(
        "full disk: the evaluation's images",
        ("save_images=true",),
        "cannot write {tmp}/eval/images/full-",  # the full model's folder: its label and a short hash of its key
        app="evaluate",
        keeps=("cache",),  # the full model's finished references are kept for the next try
    ),
    Case(
        "full disk: the results",
        (),
        "cannot write {tmp}/eval/results.csv: No space left on device",
        app="evaluate",
        keeps=("cache",),
    ),
]
_FULL = {  # what fills up, by case: (folder, the part of the path that fails)
    "full disk: the run's log": ("run", "run.log"),
    "full disk: an image": ("run", "/images/"),
    "full disk: Hydra's config": ("run", ".hydra/config"),
    "full disk: the run's config": ("run", "run/config.yaml"),
    "full disk: the evaluation's images": ("eval", "/images/"),
    "full disk: the results": ("eval", "results"),
}
for _case in FULL_DISK_CASES:
    _case.setup = disk_full(*_FULL[_case.id])


@pytest.mark.parametrize("case", FULL_DISK_CASES, ids=[c.id for c in FULL_DISK_CASES])
def test_a_full_disk_is_one_line_naming_the_file_and_no_half_made_folder(case: Case, tmp_path, monkeypatch):
    test_hostile_input(case, tmp_path, monkeypatch, None)


def test_ctrl_c_in_an_evaluation_keeps_what_finished_for_a_resume(tmp_path, monkeypatch):
    import catlab.evaluate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(catlab.evaluate, "evaluate_strategies", interrupted)
    code, _, err = _call("evaluate", [a.format(tmp=tmp_path) for a in EVAL])
    assert code == 130
    assert (
        _only_line(err)
        == f"catlab: interrupted; what finished is kept: rerun with hydra.run.dir={tmp_path / 'eval'} to resume"
    )
    assert (tmp_path / "eval" / "evaluation.json").exists()


# == the results store, its manifest, the reference cache and plugin selectors ======================================
#
# The contract: nothing outside a run folder is read, moved or deleted because a file inside it says so; a table is
# built only from records made by the settings it states. A bad store file or cached reference is named in one line,
# set aside (never deleted) and recomputed; the resumed table equals a clean run's.

KEY, OTHER = "0123456789ab", "ba9876543210"  # two strategy keys (hashes)


def _stored(root: Path, key: str = KEY, **changes) -> tuple:
    """(a store at ``root`` holding one valid record of ``key``, that record's path); ``changes`` edit the record."""
    from catlab.evaluation.store import Batch, ResultStore, prompt_sha

    store = ResultStore(root)
    batch = Batch(((3, "a red circle", 0), (5, "a blue square", 1)))
    record = {
        "key": key,
        "prompt_id": 3,
        "seed": 0,
        "prompt": "a red circle",
        "prompt_sha": prompt_sha("a red circle"),
        "batch": batch.describe(),
        "setup": {},
        "process": "elsewhere",
        "label": "random",
        "macs": 10.0,
        "full_macs": 20.0,
        "selection_macs": 0.5,
        "seconds": 0.5,
        "denoise_seconds": 0.4,
        "selection_seconds": 0.01,
        "metrics": {"psnr": 20.0},
        **changes,
    }
    store.register_strategy(key, {"label": "random"})
    store.put(key, record)
    return store, store.path(key, batch.names()[0])


def _replace(path: Path, how: str, outside: Path) -> None:
    """Make the record file at ``path`` hostile in the way ``how`` says."""
    if how == "folder":
        path.unlink()
        path.mkdir()
        (path / "inside").write_text("{}")
    elif how == "fifo":
        path.unlink()
        os.mkfifo(path)
    elif how == "link outside":
        outside.write_text(path.read_text())  # a valid record, but not the store's
        path.unlink()
        path.symlink_to(outside)
    elif how == "nested":
        path.write_text("[" * 200_000 + "]" * 200_000)
    elif how == "huge":
        path.write_text(" " * (2 << 20) + "{}")
    else:
        text = path.read_text()
        for old, new in BAD_VALUES[how]:
            assert old in text
            text = text.replace(old, new)
        path.write_text(text)


BAD_VALUES = {  # how: (text in a valid record, what replaces it)
    "NaN metric": [('"psnr": 20.0', '"psnr": NaN')],
    "inf metric": [('"psnr": 20.0', '"psnr": -Infinity')],
    "metric a string": [('"psnr": 20.0', '"psnr": "20"')],
    "macs 0": [('"macs": 10.0', '"macs": 0')],
    "macs NaN": [('"macs": 10.0', '"macs": NaN')],
    "macs 10**400": [('"macs": 10.0', f'"macs": {10**400}')],
    "macs a list": [('"macs": 10.0', '"macs": [10]')],
    "seconds 0": [('"seconds": 0.5', '"seconds": 0')],
    "negative selection MACs": [('"selection_macs": 0.5', '"selection_macs": -1')],
}
HOSTILE_FILES = [*BAD_VALUES, "folder", "fifo", "link outside", "nested", "huge"]


@pytest.mark.parametrize("how", HOSTILE_FILES)
def test_a_store_record_with_bad_values_or_no_file_is_named_and_set_aside(tmp_path, caplog, how):
    """Read without waiting on it or following it; one warning line; moved to rejected/ (never deleted)."""
    import logging

    store, path = _stored(tmp_path / "store")
    outside = tmp_path / "outside.json"
    _replace(path, how, outside)
    kept = outside.read_text() if outside.exists() else None
    with caplog.at_level(logging.WARNING, logger="catlab"):
        assert store.load(KEY, path.name) is None
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1 and warned[0].startswith(f"catlab: bad store record {path}: ") and "\n" not in warned[0]
    assert not os.path.lexists(path) and os.path.lexists(tmp_path / "store" / "rejected" / KEY / path.name)
    assert (outside.read_text() if outside.exists() else None) == kept  # a link's target is neither read nor moved


def test_a_strategy_folder_that_links_outside_the_store_is_neither_read_nor_moved(tmp_path, caplog):
    import logging
    import shutil

    store, path = _stored(tmp_path / "store")
    shutil.move(path.parent, tmp_path / "victim")
    path.parent.symlink_to(tmp_path / "victim")
    before = _snapshot(tmp_path / "victim")
    with caplog.at_level(logging.WARNING, logger="catlab"):
        assert store.load(KEY, path.name) is None and store.timings(KEY) == {}
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1 and "strategy folder is a symbolic link" in warned[0] and "left where it is" in warned[0]
    assert _snapshot(tmp_path / "victim") == before


def _claim(store, batch, **info) -> None:
    (store.root / "claims").mkdir(exist_ok=True)
    (store.root / "claims" / f"{batch.id}.claim").write_text(json.dumps(info))


def test_a_claim_naming_a_live_unrelated_process_is_taken_over_at_once(tmp_path):
    """A claim carries its process's start time: a live pid that is not that process holds nothing."""
    import socket

    from catlab.evaluation.store import Batch, ResultStore, _started

    store, batch = ResultStore(tmp_path / "store"), Batch(((0, "a", 0),))
    host = socket.gethostname().replace(".", "_")
    _claim(store, batch, host=host, pid=os.getppid(), process="another")  # a live pid, no start time: not its claim
    assert store.holder(batch) is None and store.claim(batch)
    store.release(batch)
    _claim(store, batch, host=host, pid=os.getpid(), started=_started(os.getpid()), process="another")
    if _started(os.getpid()) is not None:
        _claim(store, batch, host=host, pid=os.getpid(), started=_started(os.getpid()) + 1, process="another")
        assert store.claim(batch)  # the same pid, started at another time: a reused pid


def test_a_wait_for_a_held_batch_is_logged_and_times_out(tmp_path, monkeypatch, caplog):
    import logging
    import socket

    from catlab.evaluation import harness
    from catlab.evaluation import store as store_module
    from catlab.evaluation.store import Batch, ResultStore, _started

    class Run(harness._Run):  # the harness's waiting, with a batch that needs nothing but a claim
        def __init__(self, store):
            self.store, self.computed, self.strategies, self.progress = store, [], [], None

        def work(self, batch):
            return {}, ([] if batch.id in self.computed else ["a strategy"])

        def compute(self, batch, jobs, missing, timed):
            self.computed.append(batch.id)

    store, batch = ResultStore(tmp_path / "store"), Batch(((0, "a", 0),))
    # held by a live process (this one's pid and start time, another store): honoured, until the wait times out
    _claim(
        store,
        batch,
        host=socket.gethostname().replace(".", "_"),
        pid=os.getpid(),
        started=_started(os.getpid()),
        process="a live holder",
    )
    monkeypatch.setattr(store_module, "CLAIM_SECONDS", 0.3)
    run = Run(store)
    with caplog.at_level(logging.INFO, logger="catlab"):
        run.run([(batch, [])], wait=0.05)
    lines = [r.getMessage() for r in caplog.records]
    assert any(f"batch {batch.id} is held by process a live holder" in ln and "waiting" in ln for ln in lines)
    assert any(ln.startswith(f"catlab: batch {batch.id} still held after") for ln in lines)
    assert run.computed == [batch.id] and not list((store.root / "claims").iterdir())


def test_a_full_disk_leaves_no_temporary_file_in_the_store_or_the_reference_cache(tmp_path, monkeypatch):
    from catlab.evaluation.reference import ReferenceCache

    store, path = _stored(tmp_path / "store")
    cache = ReferenceCache(tmp_path / "cache", {"name": "m"}, {"num_steps": 4})
    FailingWrites(monkeypatch, tmp_path, errno.ENOSPC)
    with pytest.raises(OSError):
        store.put(KEY, json.loads(path.read_text()))
    with pytest.raises(OSError):
        cache.put("a red circle", 0, torch.rand(3, 8, 8), "0123456789ab")
    monkeypatch.undo()
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    "where,match,named", [("store", ".p0", ".json:"), ("cache", ".pt.", ".pt:")], ids=["store", "reference cache"]
)
def test_an_evaluation_on_a_full_disk_is_one_line_naming_the_file_and_leaves_no_temporary_file(
    tmp_path, monkeypatch, where, match, named
):
    monkeypatch.chdir(ROOT)
    FailingWrites(monkeypatch, tmp_path / ("eval" if where == "store" else "cache"), errno.ENOSPC, match)
    code, out, err = _call("evaluate", [a.format(tmp=tmp_path) for a in EVAL])
    monkeypatch.undo()
    lines = [ln for ln in err.splitlines() if ln.startswith("catlab:")]
    assert code == 1 and "Traceback" not in err + out
    assert len(lines) == 1 and lines[0].startswith("catlab: cannot write ") and named in lines[0], err[-2000:]
    assert ".tmp" not in lines[0]  # the file it was writing, not its temporary name
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert not (tmp_path / "eval").exists()  # the run folder it made is gone; the cache keeps only what is whole


def test_the_reference_cache_removes_temporary_files_whose_writer_is_gone(tmp_path):
    import socket
    import subprocess

    from catlab.evaluation.reference import ReferenceCache

    cache = ReferenceCache(tmp_path / "cache", {"name": "m"}, {"num_steps": 4})
    gone = subprocess.run([sys.executable, "-c", "print(__import__('os').getpid())"], capture_output=True, text=True)
    dead = cache.root / f".x.pt.{socket.gethostname().replace('.', '_')}.{gone.stdout.strip()}.tmp"
    old = cache.root / ".y.pt.otherhost.1.tmp"
    live = cache.root / f".z.pt.{socket.gethostname().replace('.', '_')}.{os.getpid()}.tmp"
    for p in (dead, old, live):
        p.write_bytes(b"half")
    os.utime(old, (0, 0))
    ReferenceCache(tmp_path / "cache", {"name": "m"}, {"num_steps": 4})
    assert not dead.exists() and not old.exists() and live.exists()


def _bad_reference(path: Path, how: str) -> None:
    if how == "fifo":
        path.unlink()
        os.mkfifo(path)
    elif how == "garbage":
        path.write_bytes(b"\x80\x02not a tensor")
    else:
        torch.save(
            {
                "zeros": lambda: torch.zeros(3, 8, 8),
                "NaN": lambda: torch.full((3, 8, 8), float("nan")),
                "wrong shape": lambda: torch.rand(3, 4, 4),
                "a dict": lambda: {"image": torch.rand(3, 8, 8)},
                "integers": lambda: torch.randint(0, 255, (3, 8, 8)),
                "out of range": lambda: torch.rand(3, 8, 8) * 255,
            }[how](),
            path,
        )


@pytest.mark.parametrize(
    "how", ["zeros", "NaN", "wrong shape", "a dict", "integers", "out of range", "fifo", "garbage"]
)
def test_a_cached_reference_with_bad_values_is_named_and_set_aside(tmp_path, caplog, how):
    import logging

    from catlab.evaluation.reference import ReferenceCache

    cache = ReferenceCache(tmp_path / "cache", {"name": "m"}, {"num_steps": 4})
    image = torch.rand(3, 8, 8)
    cache.put("a red circle", 0, image, "0123456789ab")
    assert torch.equal(cache.get("a red circle", 0, "0123456789ab", (3, 8, 8)), image)
    path = cache.path("a red circle", 0, "0123456789ab")
    _bad_reference(path, how)
    with caplog.at_level(logging.WARNING, logger="catlab"):
        assert cache.get("a red circle", 0, "0123456789ab", (3, 8, 8)) is None
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1 and warned[0].startswith(f"catlab: bad cached reference {path}: ")
    assert warned[0].endswith("it will be generated again") and "\n" not in warned[0]
    assert not os.path.lexists(path) and os.path.lexists(cache.root / "rejected" / path.name)


# -- a crafted evaluation.json ---------------------------------------------------------------------------------------


def _victim(tmp_path: Path) -> Path:
    """A folder outside the run folder holding what a crafted manifest could aim at."""
    victim = tmp_path / "victim"
    _stored(victim)  # a store of its own: a record, strategy folder
    (victim / "settings.json").write_text("{}")
    (victim / KEY / "settings.json").write_text("{}")
    old = victim / KEY / ".secret.tmp"
    old.write_text("mine")
    os.utime(old, (0, 0))  # older than an hour: what the store's clean-up removes
    return victim


def _snapshot(folder: Path) -> dict[str, tuple]:
    return {
        str(p.relative_to(folder)): (p.is_dir(), None if p.is_dir() else p.read_bytes(), p.lstat().st_mtime)
        for p in folder.rglob("*")
    }


def _manifest(run: Path, store: str, key: str = KEY, batch: str = "0123456789ab") -> None:
    run.mkdir(parents=True, exist_ok=True)
    strategy = {"key": key, "label": "full", "alpha": 1.0, "start_step": 0, "steps": 4}
    plan = {"strategies": [strategy], "batches": {batch: [[3, "x", 0]]}, "store": store, "notes": []}
    (run / "evaluation.json").write_text(json.dumps(plan))


@pytest.mark.parametrize(
    "crafted",
    [
        "store outside",
        "store absolute",
        "store a link outside",
        "key a path",
        "batch a path",
        "job a path",
        "alpha a string",
        "notes a dict",
    ],
)
def test_merge_of_a_crafted_manifest_touches_nothing_outside_the_run_folder(tmp_path, crafted):
    from catlab.evaluation import merge

    victim, run = _victim(tmp_path), tmp_path / "run"
    if crafted == "store outside":
        _manifest(run, "../victim")
    elif crafted == "store absolute":
        _manifest(run, str(victim))
    elif crafted == "store a link outside":
        _manifest(run, "store")
        (run / "store").symlink_to(victim)
    else:
        (run / "store").mkdir(parents=True)
        _manifest(
            run,
            "store",
            key="../../victim/" + KEY if crafted == "key a path" else KEY,
            batch="../../victim/x" if crafted == "batch a path" else "0123456789ab",
        )
        plan = json.loads((run / "evaluation.json").read_text())
        if crafted == "job a path":
            plan["batches"]["0123456789ab"] = [["../../victim", "x", 0]]
        elif crafted == "alpha a string":
            plan["strategies"][0]["alpha"] = "1.0"
        elif crafted == "notes a dict":
            plan["notes"] = {"a": 1}
        (run / "evaluation.json").write_text(json.dumps(plan))
    before = _snapshot(victim)
    run_before = _tree(run)
    with pytest.raises(SystemExit) as stop:
        merge.main([str(run)])
    message = str(stop.value.code)
    assert message.startswith(f"catlab: cannot merge {run}:") and "\n" not in message
    assert _snapshot(victim) == before
    assert _tree(run) == run_before


@pytest.mark.slow
def test_merge_takes_a_store_kept_elsewhere_only_from_the_command_line(tmp_path, base_eval):
    import shutil

    from catlab.evaluation import merge

    base_dir, _ = base_eval
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    shutil.copytree(base_dir, run)
    shutil.move(run / "store", elsewhere)
    plan = json.loads((run / "evaluation.json").read_text())
    plan["store"] = str(elsewhere)
    (run / "evaluation.json").write_text(json.dumps(plan))
    with pytest.raises(SystemExit):
        merge.main([str(run)])
    merge.main([str(run), "--store", str(elsewhere)])
    assert table(run) == table(base_dir)


# -- through whole evaluations: the resumed table equals a clean run's ------------------------------------------------


@pytest.fixture(scope="module")
def base_eval(tmp_path_factory):
    """(a clean evaluation of the store tests' settings, its reference cache)."""
    from tests.test_store_trust import evaluate

    root = tmp_path_factory.mktemp("hostile_store")
    evaluate(root / "base", root / "cache")
    return root / "base", root / "cache"


def table(out: Path):
    from tests.test_store_trust import table as columns

    return columns(out)


def _random_records(out: Path) -> list[Path]:
    plan = json.loads((out / "evaluation.json").read_text())
    return sorted((out / "store" / plan["strategies"][1]["key"]).glob("p*.json"))


@pytest.mark.slow
def test_hostile_store_records_are_set_aside_and_recomputed_to_the_clean_table(tmp_path, base_eval, caplog):
    import logging
    import shutil

    from tests.test_store_trust import evaluate

    base_dir, cache = base_eval
    out = tmp_path / "run"
    shutil.copytree(base_dir, out)
    changes = [("metrics", {"psnr": float("nan"), "ssim": 0.5}), ("macs", 10**400), ("seconds", 0)]
    for path, (field, value) in zip(_random_records(out), changes):
        path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))
    full_key = json.loads((out / "evaluation.json").read_text())["strategies"][0]["key"]
    full = sorted((out / "store" / full_key).glob("p*"))
    _replace(full[0], "folder", tmp_path / "unused")
    _replace(full[1], "fifo", tmp_path / "unused")
    with caplog.at_level(logging.INFO, logger="catlab"):
        evaluate(out, cache)
    warned = [r.getMessage() for r in caplog.records if "bad store record" in r.getMessage()]
    assert len(warned) == 5 and all(ln.startswith("catlab: ") and "\n" not in ln for ln in warned)
    assert table(out) == table(base_dir)


@pytest.mark.slow
def test_bad_cached_references_are_set_aside_and_regenerated_to_the_clean_table(tmp_path, base_eval, caplog):
    """The random strategy's records are gone, the full model's are there: its PSNR needs the cached references."""
    import logging
    import shutil

    from tests.test_store_trust import evaluate

    base_dir, base_cache = base_eval
    out, cache = tmp_path / "run", tmp_path / "cache"
    shutil.copytree(base_dir, out)
    shutil.copytree(base_cache, cache)
    for p in _random_records(out):
        p.unlink()
    entries = sorted((cache / "references").glob("*/*.pt"))
    kinds = ["zeros", "NaN", "wrong shape", "a dict"][: len(entries)]
    assert len(kinds) >= 3
    for path, how in zip(entries, kinds):
        _bad_reference(path, how)
    with caplog.at_level(logging.INFO, logger="catlab"):
        evaluate(out, cache, "retime_batches=0")
    warned = [r.getMessage() for r in caplog.records if "bad cached reference" in r.getMessage()]
    assert len(warned) == len(kinds)
    assert table(out) == table(base_dir)


@pytest.mark.slow
def test_resuming_with_another_metrics_list_gives_the_clean_table(tmp_path, base_eval, caplog):
    """Records made with fewer metrics are computed again; records with more give no extra column."""
    import logging
    import shutil

    from tests.test_store_trust import evaluate

    base_dir, cache = base_eval  # metrics=[psnr,ssim]
    evaluate(tmp_path / "psnr", cache, "metrics=[psnr]")
    fewer = tmp_path / "fewer"
    shutil.copytree(tmp_path / "psnr", fewer)
    with caplog.at_level(logging.INFO, logger="catlab"):
        evaluate(fewer, cache)  # back to [psnr,ssim]
    assert table(fewer) == table(base_dir)
    said = [r.getMessage() for r in caplog.records]
    assert any("lack metric(s) ssim (made with another metrics list): computed again" in ln for ln in said)
    more = tmp_path / "more"
    shutil.copytree(base_dir, more)
    evaluate(more, cache, "metrics=[psnr]")
    assert table(more) == table(tmp_path / "psnr")
    assert "ssim" not in (more / "results.md").read_text()


@pytest.mark.slow
def test_merge_leaves_out_records_without_a_metric_of_the_table_and_says_so(tmp_path, base_eval):
    import shutil

    from catlab.evaluation import merge

    base_dir, _ = base_eval
    out = tmp_path / "run"
    shutil.copytree(base_dir, out)
    victim = _random_records(out)[0]
    record = json.loads(victim.read_text())
    record["metrics"] = {}
    victim.write_text(json.dumps(record))
    merge.main([str(out)])
    assert [r[7] for r in table(out)].count("2/3") == 1
    assert "random (lack psnr, ssim)" in (out / "results.md").read_text()


def test_a_new_manifest_removes_the_tables_of_the_evaluation_before_it(tmp_path):
    """A rerun that fails after it wrote its evaluation.json leaves no results.md of other jobs beside it."""
    from catlab.evaluation import merge

    merge.write_manifest(tmp_path, {"strategies": []})
    for name in merge.TABLES:
        (tmp_path / name).write_text("old")
    (tmp_path / "notes.md").write_text("the user's")
    merge.write_manifest(tmp_path, {"strategies": [1]})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evaluation.json", "notes.md"]


# -- plugin selectors that fail ---------------------------------------------------------------------------------------


class _Raises(Random):
    name = "raises_in_select"

    def select(self, state):
        if state.step == 4:
            raise RuntimeError("the plugin's own bug\nsecond line")
        return super().select(state)


class _RaisesObserving(Random):
    name = "raises_observing"

    def observe(self, step, output, indices):
        if step == 3:
            raise KeyError("state")


class _OnMeta(Random):
    name = "indices_on_meta"

    def select(self, state):
        return super().select(state).to("meta")


def _late(breaks):
    class Late(Random):
        name = f"late_{breaks.__name__.strip('_')}"

        def select(self, state):
            idx = super().select(state)
            return breaks(idx, state.grid[0] * state.grid[1]) if state.step == 4 else idx

    return Late


LATE = {"repeated": (_repeated, "twice"), "short": (_short, "returned shape"), "floats": (_floats, "float32")}
LATE["empty"] = (lambda idx, n: idx[:, :0], "returned shape")


@pytest.fixture
def plugin_selectors():
    from catlab.registry import selectors

    classes = [_Raises, _RaisesObserving, _OnMeta] + [_late(breaks) for breaks, _ in LATE.values()]
    for kind, cls in zip(["raises", "observing", "meta", *LATE], classes):
        fixed = {"raises": "raises_in_select", "observing": "raises_observing", "meta": "indices_on_meta"}
        cls.name = fixed.get(kind, f"late_{kind}")
        selectors._entries[cls.name] = cls
        cls.registered_name = cls.name
    yield
    for cls in classes:
        selectors._entries.pop(cls.name, None)


@pytest.mark.parametrize(
    "name,words",
    [
        (
            "raises_in_select",
            "catlab: selector 'raises_in_select' failed at step 4: RuntimeError: the plugin's own bug",
        ),
        ("raises_observing", "catlab: selector 'raises_observing' failed at step 3 observing its output: KeyError"),
        ("indices_on_meta", "catlab: selector 'indices_on_meta' at step 3 returned indices on meta"),
        *[(f"late_{kind}", f"catlab: selector 'late_{kind}' at step 4 returned") for kind in LATE],
    ],
)
def test_a_plugin_selector_that_fails_after_its_first_step_is_one_line_and_leaves_nothing(
    tmp_path, monkeypatch, plugin_selectors, name, words
):
    """Pruned steps are 3 and 4: a selector that breaks at its second pruned step is caught on a CPU too."""
    monkeypatch.chdir(ROOT)
    (tmp_path / "marker").write_text("")
    before = _tree(tmp_path)
    argv = [a.format(tmp=tmp_path) for a in RUN] + ["selector=random", f"selector.name={name}"]
    code, out, err = _call("run", argv)
    lines = [ln for ln in err.splitlines() if ln.startswith("catlab:")]
    assert code == 1 and "Traceback" not in err + out
    assert len(lines) == 1 and lines[0].startswith(words), err[-2000:]
    assert _tree(tmp_path) == before


def test_the_device_side_check_flags_a_broken_later_step_without_a_host_read():
    """On a GPU the later steps' values are checked into a flag on the device, read once at the last step."""
    from catlab.planner import IndexContractError, StepKind, StepPlan, StepPlanner, flag_broken
    from catlab.pruning import no_host_sync

    good = torch.tensor([[0, 2, 5], [1, 3, 4]])
    with no_host_sync("the device-side index check"):
        flag = flag_broken(good, 6, 3, None)
        flag = flag_broken(torch.tensor([[0, 0, 5], [1, 3, 4]]), 6, 4, flag)  # a token twice
        flag = flag_broken(torch.tensor([[0, 1, 9], [1, 3, 4]]), 6, 5, flag)  # later breakage keeps the first step
    assert int(flag) == 4
    assert int(flag_broken(torch.tensor([[0, 6]]), 6, 7, None)) == 7 and int(flag_broken(good, 6, 7, None)) == 0
    planner = StepPlanner(Random(start_step=1))  # the flag is read once, when the generation's last step is observed
    planner.reset(2, (2, 3), 6, "cpu")
    planner.flag = flag
    planner.observe(StepPlan(5, StepKind.FULL, 6), torch.zeros(2, 6, 4), None)
    with pytest.raises(IndexContractError, match="selector 'random' at step 4 returned indices outside"):
        planner.observe(StepPlan(6, StepKind.FULL, 6), torch.zeros(2, 6, 4), None)
