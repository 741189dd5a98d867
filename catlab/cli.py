"""The command-line layer of ``catlab.run`` and ``catlab.evaluate``: whatever a user gets wrong ends in one line.

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
one line by :func:`catlab.builders.run_app`. ``HYDRA_FULL_ERROR=1`` set by the
user keeps Hydra's full report.
"""

from __future__ import annotations

import difflib
import errno
import os
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

CONF = Path(__file__).resolve().parents[1] / "conf"

#: errors that mean "this place cannot be written", as opposed to a file that is missing or unreadable
WRITE_ERRNOS = {
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOSPC,
    errno.EDQUOT,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.EEXIST,
    errno.EFBIG,
}


class CatlabExit(SystemExit):
    """Ends a command with one ``catlab:`` line on stderr and exit status 1."""

    def __init__(self, message: str):
        super().__init__(1)
        self.message = message if message.startswith("catlab:") else f"catlab: {message}"


def io_message(err: OSError) -> str:
    """``cannot write <path>: <reason>`` for an error that stops a write; the plain error otherwise."""
    path = err.filename if err.filename is not None else "?"
    reason = err.strerror or str(err)
    if err.errno in WRITE_ERRNOS:
        return f"catlab: cannot write {path}: {reason}"
    return f"catlab: cannot access {path}: {reason}"


def os_error(err: BaseException) -> OSError | None:
    """The OSError behind ``err`` (itself, or its cause: logging and Hydra wrap them), if any."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, OSError) and err.errno is not None:
            return err
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


def check_writable(folder: Path | str) -> None:
    """Fail now, before any compute, where ``folder`` cannot be made or written; leave nothing behind.

    Makes the missing folders, writes and removes a small probe file, then removes
    the folders it made (the run makes them again when it writes). Raises
    :class:`OSError` naming the path.
    """
    folder = Path(folder).expanduser()
    missing, p = [], folder
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    if p.exists() and not p.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(p))
    made: list[Path] = []
    try:
        for d in reversed(missing):
            d.mkdir()
            made.append(d)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".catlab-probe-")
        try:
            os.write(fd, b"catlab")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as err:  # named by the folder the run asked for, not by the probe
        raise type(err)(err.errno, err.strerror, str(folder)) from None
    finally:
        for d in reversed(made):
            d.rmdir()


def write_text(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all (a ``.tmp`` file renamed over it; removed when the write fails)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def main(hydra_main: Callable[[], None], argv: Sequence[str] | None = None, config_name: str = "config") -> None:
    """Run the ``@hydra.main`` function ``hydra_main`` with ``argv`` (default: the command line).

    Hydra's own errors become one ``catlab:`` line on stderr and exit status 1
    (:class:`CatlabExit`); so do the one-line errors of the run itself.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    made = _missing_roots(argv)
    keep_full = os.environ.get("HYDRA_FULL_ERROR") == "1"
    saved_argv, saved_env = sys.argv, os.environ.get("HYDRA_FULL_ERROR")
    sys.argv = [saved_argv[0] if saved_argv else "catlab", *argv]
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing its report; we print one line
    try:
        hydra_main()
    except CatlabExit as err:
        _fail(err.message, made)
    except SystemExit:
        raise
    except Exception as err:  # noqa: BLE001 (what Hydra raised before or around the run)
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
        _clear_hydra()


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
    import shutil

    for root in roots:
        if root.is_dir() and not any(p.is_file() or p.is_symlink() for p in root.rglob("*")):
            shutil.rmtree(root, ignore_errors=True)


def _fail(message: str, made: list[Path] = ()) -> None:
    _remove_empty(list(made))
    print(message, file=sys.stderr, flush=True)
    raise SystemExit(1)


def _clear_hydra() -> None:
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()


def hydra_message(err: Exception, argv: Sequence[str], config_name: str) -> str | None:
    """One line for an error Hydra raised (composition, overrides, output folders); ``None``: not Hydra's."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    io = os_error(err)
    if io is not None:
        return io_message(io)
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


def unknown_option(group: str, name: str, options: list[str]) -> str:
    near = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    hint = f" (did you mean '{group}={near[0]}'?)" if near else ""
    return f"catlab: unknown option '{group}={name}'{hint}; options of {group}: {', '.join(options) or '(none)'}"


def unknown_key(key: str, argv: Sequence[str], config_name: str) -> str:
    """``unknown key 'a.b' (did you mean 'a.c'?); keys of a=<option>: ...`` from the config composed without it."""
    from omegaconf import OmegaConf

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
    from omegaconf import DictConfig, OmegaConf

    if not isinstance(node, DictConfig):
        return []
    keys = [str(k) for k in node.keys()]
    name = OmegaConf.select(node, "name", default=None)
    from catlab.registry import REGISTRIES, config_fields

    registry = REGISTRIES.get(group)
    if registry is not None and isinstance(name, str):
        try:
            keys += [f for f in config_fields(registry.get(name)) if f not in keys]
        except Exception:  # noqa: BLE001 (an unknown component: its own error comes later)
            pass
    return keys


def _compose_without(key: str, argv: Sequence[str], config_name: str):
    """The config composed from ``argv`` less the overrides of ``key`` (and the Hydra flags), with the choices."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

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
