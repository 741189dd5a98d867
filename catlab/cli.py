"""The command line of ``catlab.run`` and ``catlab.evaluate``: whatever a user gets wrong ends in one line.

Hydra composes the config and makes the run directory before catlab's code runs;
its own errors (a misspelt key, an unknown option, a run directory it cannot
make) would print several lines and advise ``+key=...``, the wrong fix for a
typo. :func:`main` runs a Hydra app and turns those into one ``catlab:`` line
and exit status 1:

- an unknown key: ``catlab: unknown key 'selector.alpah' (did you mean 'selector.alpha'?); keys of
  selector=cat: alpha, ...``;
- an unknown option of a group: ``catlab: unknown option 'selector=nope' (did you mean ...?); options of
  selector: ...``;
- a folder or file that cannot be written: ``catlab: cannot write <path>: <reason>``.

Errors inside a run (a bad value, a refused size, a failed write) are turned into
one line by :func:`run_app`. ``HYDRA_FULL_ERROR=1`` set by the user keeps
Hydra's full report.

The clean-up policy lives here too: a failed or interrupted single run removes
exactly what the command made. :class:`OutputFolder` (a Hydra callback in both
apps' configs) notes what the output folder held before Hydra wrote into it; a
folder the command made is removed whole, with the empty folders made above it,
and a folder that was there before (an empty one, ``.``, a user's folder with
files) is left as it was: only the new entries go. A folder catlab did not make
is never removed. Ctrl-C ends a run the same way, with ``catlab: interrupted``
and exit status 130.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
import re
import shutil
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import diffusers
import transformers
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from catlab.builders import ConfigError
from catlab.config import EvaluateConfig, RunConfig, group_options
from catlab.fileio import CatlabExit, check_writable, io_message, os_error, write_text
from catlab.planner import IndexContractError
from catlab.pruning.families import UnsupportedModelError
from catlab.registry import REGISTRIES, config_fields
from catlab.stepcache import StepCacheError
from catlab.sweep import summarise_aborted

__all__ = ["CatlabExit", "OutputFolder", "check_writable", "io_message", "main", "os_error", "run_app", "write_text"]

CONF = Path(__file__).resolve().parents[1] / "conf"
#: exit status of a command stopped by Ctrl-C (128 + SIGINT, as a shell reports it)
INTERRUPTED = 130
#: what torch's C++ file writer raises when a write fails (a full disk): a RuntimeError, not an OSError
TORCH_WRITE = re.compile(r"PytorchStreamWriter|file write failed|inline_container")
#: entries of an existing output folder noted one by one; past this only its top level is compared
SNAPSHOT_LIMIT = 20000


# -- what the output folder held before the command ------------------------------------------------------------------


@dataclass
class Before:
    """An output folder as it was before Hydra made it or wrote into it."""

    folder: Path
    cwd: Path
    #: the entries (paths relative to ``folder``) it held; None: it did not exist
    entries: set[str] | None
    #: the snapshot holds only the top level (a folder with more than :data:`SNAPSHOT_LIMIT` entries)
    top_only: bool = False
    #: the nearest folder above ``folder`` that existed (the folders between were made by the command)
    existing_parent: Path | None = None
    #: a single run (RUN mode); a sweep's folder keeps its job records whatever happens
    single: bool = True

    @classmethod
    def of(cls, folder: Path | str, single: bool) -> Before:
        cwd = Path.cwd()
        folder = Path(os.path.abspath(Path(folder).expanduser()))
        if not folder.is_dir():
            parent = next(p for p in folder.parents if p.exists())
            return cls(folder, cwd, None, single=single, existing_parent=parent)
        entries: set[str] = set()
        for root, dirs, files in os.walk(folder):
            rel = Path(root).relative_to(folder)
            entries.update(str(rel / name) for name in (*dirs, *files))
            if len(entries) > SNAPSHOT_LIMIT:
                return cls(folder, cwd, {p.name for p in folder.iterdir()}, top_only=True, single=single)
        return cls(folder, cwd, entries, single=single)

    def restore(self) -> None:
        """Remove what the command added: the folder itself if it made it (and the empty folders it made above
        it), else the entries that were not there. Files that were there are not touched."""
        _close_logs(self.folder)
        try:
            here = Path(os.getcwd())
        except FileNotFoundError:
            here = self.folder
        if here == self.folder or self.folder in here.parents:
            os.chdir(self.cwd)  # hydra.job.chdir=true: leave the folder before it goes
        if not self.folder.exists() and not self.folder.is_symlink():
            return
        if self.entries is None:
            _remove(self.folder)
            for parent in self.folder.parents:  # the folders made on the way (outputs/, the date), while empty
                if parent == self.existing_parent or not parent.is_dir() or any(parent.iterdir()):
                    break
                parent.rmdir()
            return
        for root, dirs, files in os.walk(self.folder):
            rel = Path(root).relative_to(self.folder)
            for name in list(dirs) + files:
                key = str(rel / name)
                if key in self.entries or (self.top_only and str(rel) != "."):
                    continue
                _remove(Path(root) / name)
                if name in dirs:
                    dirs.remove(name)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


_BEFORE: Before | None = None


class OutputFolder(Callback):
    """Notes what the run (or sweep) folder held before Hydra writes into it, for :func:`run_app`'s clean-up."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        global _BEFORE
        _BEFORE = Before.of(config.hydra.run.dir, single=True)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        global _BEFORE
        _BEFORE = Before.of(config.hydra.sweep.dir, single=False)


def _close_logs(out: Path) -> None:
    """Close the log files under ``out`` (the run's log, before its folder goes)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and Path(out).resolve() in Path(handler.baseFilename).parents:
            handler.close()
            root.removeHandler(handler)


# -- the command -----------------------------------------------------------------------------------------------------


def main(hydra_main: Callable[[], None], argv: Sequence[str] | None = None, config_name: str = "config") -> None:
    """Run the ``@hydra.main`` function ``hydra_main`` with ``argv`` (default: the command line).

    Hydra's own errors become one ``catlab:`` line on stderr and exit status 1
    (:class:`CatlabExit`); so do the one-line errors of the run itself, and Ctrl-C
    (exit status 130).
    """
    global _BEFORE
    argv = list(sys.argv[1:] if argv is None else argv)
    wrong = wrong_command(argv, config_name)
    if wrong is not None:
        _fail(wrong)
    made = _missing_roots(argv)
    keep_full = os.environ.get("HYDRA_FULL_ERROR") == "1"
    saved_argv, saved_env, saved_cwd = sys.argv, os.environ.get("HYDRA_FULL_ERROR"), os.getcwd()
    sys.argv = [saved_argv[0] if saved_argv else "catlab", *argv]
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing its report; we print one line
    _BEFORE = None
    try:
        hydra_main()
    except CatlabExit as err:
        _fail(err.message, made, err.code)
    except KeyboardInterrupt:
        _fail(_interrupted(), made, INTERRUPTED)
    except SystemExit:
        raise
    except Exception as err:  # noqa: BLE001 (what Hydra raised before or around the run)
        if _BEFORE is not None and not _BEFORE.single and _worker_died(err):
            why = _first(err).split(". ")[0].rstrip(".")
            _fail(summarise_aborted(_BEFORE.folder, f"a sweep worker process died ({why})"), made)
        if keep_full:
            raise
        message = hydra_message(err, argv, config_name)
        if message is None:
            raise
        _fail(message, made)
    finally:
        sys.argv = saved_argv
        if saved_env is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved_env
        _BEFORE = None
        if os.path.isdir(saved_cwd):
            os.chdir(saved_cwd)
        _clear_hydra()


#: the command line of each app, by the name of the config it composes
COMMANDS = {"config": "python -m catlab.run", "evaluate": "python -m catlab.evaluate"}


def _own_fields(config_name: str) -> set[str]:
    """The top-level settings only one of the two commands has (``num_images`` for a run, ``strategies`` for an
    evaluation)."""
    run = {f.name for f in dataclasses.fields(RunConfig)}
    evaluate = {f.name for f in dataclasses.fields(EvaluateConfig)}
    return run - evaluate if config_name == "config" else evaluate - run


def wrong_command(argv: Sequence[str], config_name: str) -> str | None:
    """The line for an experiment or a setting of the other command (``experiment=embedded_table2`` given to
    ``catlab.run``), naming the command that takes it; None when nothing points there."""
    other = "evaluate" if config_name == "config" else "config"
    theirs = _own_fields(other)
    for a in argv:
        key, _, value = a.lstrip("+~").partition("=")
        if key == "experiment" and value:
            path = CONF / "experiment" / f"{value}.yaml"
            try:
                keys = set(yaml.safe_load(path.read_text()) or {}) if path.is_file() else set()
            except (OSError, yaml.YAMLError):
                continue
            if keys & theirs and not keys & _own_fields(config_name):
                return f"catlab: experiment={value} is a setup of the other command; run {COMMANDS[other]} {a}"
        elif key.split(".")[0] in theirs:
            top = key.split(".")[0]
            near = difflib.get_close_matches(top, sorted(_own_fields(config_name)), n=1, cutoff=0.7)
            here = f" (did you mean '{near[0]}'?)" if near else ""
            if top == "selector" and config_name == "evaluate":
                here = " (here strategies=[...] and strategy_defaults.<key>=... set the selectors)"
            return (
                f"catlab: '{top}' is a setting of {COMMANDS[other]}, not of {COMMANDS[config_name]}{here}; "
                f"to run it: {COMMANDS[other]} {a}"
            )
    return None


def _interrupted() -> str:
    if _BEFORE is not None and not _BEFORE.single and _BEFORE.folder.is_dir():
        return summarise_aborted(_BEFORE.folder, "interrupted")
    return "catlab: interrupted; nothing this run wrote was kept"


def _worker_died(err: BaseException) -> bool:
    """A sweep's worker process ended under it (killed, out of memory): joblib's and concurrent.futures' errors."""
    seen = 0
    while err is not None and seen < 8:
        if type(err).__name__ in ("TerminatedWorkerError", "BrokenProcessPool"):
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def _missing_roots(argv: Sequence[str]) -> list[Path]:
    """The first folder of each output directory named on the command line that does not exist yet."""
    roots = []
    for a in argv:
        key, _, value = a.lstrip("+").partition("=")
        if key in ("hydra.run.dir", "hydra.sweep.dir") and value and "$" not in value:
            p = Path(value).expanduser().absolute()
            while not p.parent.exists() and p.parent != p:
                p = p.parent
            if not p.exists():
                roots.append(p)
    return roots


def _remove_empty(roots: list[Path]) -> None:
    """Remove the folders the failed command made on its way to its output directory, where nothing is in them."""
    for root in roots:
        if root.is_dir() and not any(p.is_file() or p.is_symlink() for p in root.rglob("*")):
            shutil.rmtree(root, ignore_errors=True)


def _fail(message: str, made: Sequence[Path] = (), code: int = 1) -> None:
    global _BEFORE
    if _BEFORE is not None and _BEFORE.single:  # a single run that failed before or around run_app
        _BEFORE.restore()
        _BEFORE = None
    _remove_empty(list(made))
    print(message, file=sys.stderr, flush=True)
    raise SystemExit(code)


# -- the run's own errors --------------------------------------------------------------------------------------------


def quiet_libraries() -> None:
    """Keep a run's console and log to catlab's own lines: the libraries' known-harmless notices are errors-only.

    (diffusers' "install accelerate" advice, transformers' torchvision notices, weight-loading
    progress bars, deprecation warnings of arguments catlab does not pass.)
    """
    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()
    for module in ("diffusers", "transformers", "torch", "huggingface_hub"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)


def run_app(run: Callable[[DictConfig, Path], object], cfg: DictConfig, resumable: bool = False) -> None:
    """Run a Hydra app's ``run(cfg, output_dir)``; whatever a user can cause ends in one line, not a traceback.

    A config error, a refused step cache, a model the strategy cannot prune or a folder that cannot be written
    (``catlab: cannot write <path>: <reason>``) ends a single run with that line
    (:class:`CatlabExit`, exit status 1) and removes what the command made
    (:class:`Before`); Ctrl-C does the same with ``catlab: interrupted`` (exit
    status 130). A sweep job that fails for any reason writes its first error
    line to its log and to ``failed.json`` (the traceback too, for the
    developer) and lets the sweep go on: the sweep's summary
    (:mod:`catlab.sweep`) lists it as failed and the sweep exits non-zero. A
    sweep job stopped by Ctrl-C is marked failed and stops the sweep. A ``resumable`` app (an evaluation, whose
    store a rerun into the same folder resumes from) keeps its folder on Ctrl-C and says how to resume.
    """
    global _BEFORE
    quiet_libraries()
    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    single = hc.mode == RunMode.RUN
    before = _BEFORE if single and _BEFORE is not None else Before.of(out, single=single)
    try:
        with LogWrites() as log_writes:
            check_choices(cfg, hc)
            run(cfg, out)
        log_writes.check()
    except KeyboardInterrupt:
        if single and resumable:
            _close_logs(out)
            _BEFORE = None
            raise CatlabExit(
                f"catlab: interrupted; what finished is kept: rerun with hydra.run.dir={out} to resume", INTERRUPTED
            ) from None
        if single:
            before.restore()
            _BEFORE = None
            removed = "removed the run folder" if before.entries is None else "removed what it had written into"
            raise CatlabExit(f"catlab: interrupted; {removed} {before.folder}", INTERRUPTED) from None
        _write_failed(out, {"error": "catlab: interrupted"})
        raise
    except Exception as err:  # noqa: BLE001 (sorted below: an input, a write, or a bug)
        message = error_line(err, out)
        if single:
            before.restore()  # a bug leaves no half-made folder either
            _BEFORE = None
        if message is None and single:
            raise  # a bug, not an input: its traceback is what the developer needs
        if message is None:
            first = (str(err).strip().splitlines() or [""])[0]
            message = f"catlab: {type(err).__name__}: {first}" if first else f"catlab: {type(err).__name__}"
        if single:
            raise CatlabExit(message) from None
        # a sweep job: marked failed, and the sweep goes on (its summary lists it; the exit code says so)
        logging.getLogger("catlab").error(message)
        record = {"error": message}
        if not isinstance(err, (ConfigError, StepCacheError)):
            record["traceback"] = "".join(traceback.format_exception(err))
        _write_failed(out, record)


class LogWrites:
    """The run's log files, whose failed writes (a full disk) are kept as one error instead of a traceback per line.

    :meth:`check` raises the first, naming the log file: a run whose log could not be
    written fails with one line like any other write.
    """

    def __enter__(self) -> LogWrites:
        self.errors: list[OSError] = []
        self.handlers = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
        for handler in self.handlers:
            handler.handleError = self._recorder(handler)  # shadows logging's, which prints a traceback
        return self

    def _recorder(self, handler: logging.FileHandler) -> Callable[[logging.LogRecord], None]:
        def record(_: logging.LogRecord) -> None:
            err = sys.exc_info()[1]
            if isinstance(err, OSError) and not self.errors:
                self.errors.append(OSError(err.errno, err.strerror, err.filename or handler.baseFilename))

        return record

    def __exit__(self, *exc) -> None:
        for handler in self.handlers:
            handler.__dict__.pop("handleError", None)

    def check(self) -> None:
        if self.errors:
            raise self.errors[0]


def error_line(err: Exception, out: Path) -> str | None:
    """The one line for an error a user can cause (a config, a write, a plugin breaking the contract); None: a bug."""
    io = os_error(err)
    if isinstance(err, (ConfigError, StepCacheError)):
        kind = "config error" if isinstance(err, ConfigError) else "step cache error"
        return str(err) if str(err).startswith("catlab:") else f"catlab: {kind}: {err}"
    if io is not None:
        return io_message(io, out)
    if isinstance(err, IndexContractError):  # a selector (often a plugin) that breaks the contract
        return f"catlab: {err}"
    if isinstance(err, UnsupportedModelError):  # a model the chosen strategy cannot prune
        return f"catlab: unsupported model: {err}"
    if isinstance(err, RuntimeError) and TORCH_WRITE.search(str(err)):
        where = _saved_to(err) or f"a tensor file in {out} or the cache"
        return f"catlab: cannot write {where}: the disk may be full (torch: {_first(err)})"
    return None


def _saved_to(err: BaseException) -> str | None:
    """The file ``torch.save`` was writing when ``err`` was raised (its C++ writer names only the archive's member)."""
    tb = err.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "save" and "torch" in frame.f_code.co_filename:
            target = frame.f_locals.get("f")
            if isinstance(target, (str, os.PathLike)):
                return os.fspath(target)
        tb = tb.tb_next
    return None


def _first(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _write_failed(out: Path, record: dict) -> None:
    try:
        (out / "failed.json").write_text(json.dumps(record) + "\n")
    except OSError:
        pass  # the folder cannot be written: the summary calls the job unfinished, the log says why


def check_choices(cfg: DictConfig, hc) -> None:
    """Refuse what Hydra lets through quietly: an option of an optional group (``experiment=nope``) that does
    not exist, and a top-level key the schema does not have (``+foo=1``)."""
    if GlobalHydra.instance().is_initialized():
        loader = GlobalHydra.instance().config_loader()
        for group, choice in hc.runtime.choices.items():
            if choice is None or group.startswith("hydra") or "/" in group:
                continue
            options = loader.get_group_options(group)
            if options and choice not in options:
                raise ConfigError(unknown_option(group, str(choice), options))
    schema = OmegaConf.get_type(cfg)
    if dataclasses.is_dataclass(schema):
        fields = [f.name for f in dataclasses.fields(schema)]
        for key in cfg.keys():
            if key not in fields:
                raise ConfigError(key_line(str(key), fields, "the config"))


# -- Hydra's errors --------------------------------------------------------------------------------------------------


def _clear_hydra() -> None:
    GlobalHydra.instance().clear()


def hydra_message(err: Exception, argv: Sequence[str], config_name: str) -> str | None:
    """One line for an error Hydra raised (composition, overrides, output folders); ``None``: not Hydra's."""
    io = os_error(err)
    if io is not None:
        return io_message(io)
    if isinstance(err, ValueError) and "Config group override must be a string" in str(err):
        return null_group(argv)
    if not isinstance(err, (HydraException, OmegaConfBaseException)):
        return None
    text = str(err) + ("\n" + str(err.__cause__) if err.__cause__ is not None else "")
    key = re.search(r"Could not override '([^']+)'", text)
    missing = re.search(r"Key '([^']+)' (?:is )?not in", text)
    if key and missing:
        return unknown_key(key.group(1), argv, config_name)
    option = re.search(r"Could not find '([^']+)/([^']+)'", text)
    if option:
        group, name = option.groups()
        options = [line.strip() for line in text.splitlines() if line.startswith("\t") and "=" not in line]
        return unknown_option(group, name, options)
    lines = [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.startswith(("To append", "Set the environment", "    "))
    ]
    return "catlab: config error: " + "; ".join(lines)


def null_group(argv: Sequence[str]) -> str:
    """The line for ``model=null``: a config group given no option."""
    for a in argv:
        key, _, value = a.lstrip("+").partition("=")
        if value.lower() in ("null", "~", "none") and group_options(key):
            return (
                f"catlab: {key}={value} gives the {key} group no option; choose one: {key}=<option> "
                f"(options of {key}: {', '.join(group_options(key))})"
            )
    return "catlab: config error: a config group was given null; choose one of its options"


def unknown_option(group: str, name: str, options: list[str]) -> str:
    near = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    hint = f" (did you mean '{group}={near[0]}'?)" if near else ""
    return f"catlab: unknown option '{group}={name}'{hint}; options of {group}: {', '.join(options) or '(none)'}"


def unknown_key(key: str, argv: Sequence[str], config_name: str) -> str:
    """``unknown key 'a.b' (did you mean 'a.c'?); keys of a=<option>: ...`` from the config composed without it."""
    cfg, choices = _compose_without(key, argv, config_name)
    parts = key.split(".")
    for i in range(1, len(parts)):  # the first part that is not there is the unknown key
        if cfg is not None and OmegaConf.select(cfg, ".".join(parts[:i]), default=None) is None:
            key = ".".join(parts[:i])
            break
    parent, _, leaf = key.rpartition(".")
    node = (OmegaConf.select(cfg, parent, default=None) if parent else cfg) if cfg is not None else None
    keys = _keys_of(node, parent)
    where = (
        (f"{parent}={choices[parent]}" if parent in choices and choices[parent] else parent)
        if parent
        else "the config"
    )
    return key_line(key, keys, where)


def key_line(key: str, keys: list[str], where: str) -> str:
    """The one line for ``key`` missing from a node with ``keys`` (``where``: e.g. ``selector=cat``)."""
    parent, _, leaf = key.rpartition(".")
    if leaf in keys:  # a key the component takes that its config file leaves out
        return (
            f"catlab: key '{key}' is not in the config file of {where} (the component takes it); "
            f"give it with '+{key}=...'"
        )
    near = difflib.get_close_matches(leaf, keys, n=1, cutoff=0.6)
    hint = f" (did you mean '{(parent + '.') if parent else ''}{near[0]}'?)" if near else ""
    return f"catlab: unknown key '{key}'{hint}; keys of {where}: {', '.join(keys) or '(none)'}"


def _keys_of(node, group: str) -> list[str]:
    """The keys a node may hold: its own, and for a component group the fields its registered class takes."""
    if not isinstance(node, DictConfig):
        return []
    keys = [str(k) for k in node.keys()]
    name = OmegaConf.select(node, "name", default=None)
    registry = REGISTRIES.get(group)
    if registry is not None and isinstance(name, str):
        try:
            keys += [f for f in config_fields(registry.get(name)) if f not in keys]
        except Exception:  # noqa: BLE001 (an unknown component: its own error comes later)
            pass
    return keys


def _compose_without(key: str, argv: Sequence[str], config_name: str):
    """The config composed from ``argv`` less the overrides of ``key`` (and the Hydra flags), with the choices."""
    kept = [
        a
        for a in argv
        if not a.startswith("-") and not a.lstrip("+~").startswith("hydra") and a.lstrip("+~").split("=", 1)[0] != key
    ]
    kept = [a for a in kept if "," not in a.split("=", 1)[-1] or a.split("=", 1)[-1].startswith("[")]
    _clear_hydra()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=kept, return_hydra_config=True)
        choices = dict(cfg.hydra.runtime.choices)
        with open_dict(cfg):
            del cfg["hydra"]
        return cfg, choices
    except Exception:  # noqa: BLE001 (the rest of the line is wrong too: list what can be listed)
        return None, {}
    finally:
        _clear_hydra()
