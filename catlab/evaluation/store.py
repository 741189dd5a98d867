"""The results store: one JSON record per image, keyed by everything that made it.

Layout of ``<store>/``::

    <strategy key>/strategy.json               what the key stands for (label, spec, model)
    <strategy key>/p000003_s0_<batch>.json     one image's record
    <strategy key>/timings/<batch>_<process>.json   one timed batch (for speed-ups)
    claims/<batch>.claim                       a batch some live process is computing
    rejected/...                               records that failed validation, set aside

A record's path names everything that decides its numbers: the strategy key
(selector, its parts, reuse rule, step cache, model config and weights, sampler
steps and guidance, the MAC rule's version), the prompt's position and seed, and
the batch it was generated in (the prompt texts, ids and seeds of the whole
batch, in order: a stochastic selector's draws and float rounding depend on a
sample's batch). The record repeats these fields; :meth:`ResultStore.load`
checks them against the path and sets a record that fails aside.

Writes are atomic (a temporary file, then rename): a killed process leaves
either a whole record or none, plus at most a temporary file that the next
store opened on the same host removes; a write that fails (a full disk) removes
its own temporary file.

Nothing in the store is trusted: a file is read only if it is a regular file
inside the store (never a link, a FIFO or a folder), no larger than a record can
be, and a record's numbers must be finite and in range. A file that fails is
named in one line and set aside, and the record is computed again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import socket
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from catlab.hashing import config_hash

log = logging.getLogger("catlab.evaluate")

#: the numbers every record carries (type checked on read)
NUMBERS = ("macs", "full_macs", "selection_macs", "seconds", "denoise_seconds", "selection_seconds")
#: a temporary file older than this is stale even when its writer cannot be checked (another host)
STALE_SECONDS = 3600.0
#: a claim by a process on another host is honoured this long after it was made; a batch waited for this long is
#: taken over whoever holds it
CLAIM_SECONDS = 3600.0
#: the largest store file read (a record is a few kB; a timing or claim less)
MAX_BYTES = 1 << 20
#: what a strategy key and a batch id look like (both name folders and files: nothing else may)
HASH = re.compile(r"[0-9a-f]{12}")
#: numbers that must be > 0 (the rest of NUMBERS must be >= 0)
POSITIVE = ("macs", "full_macs", "seconds")


def prompt_sha(prompt: str) -> str:
    """The identity of a prompt's text (12 hex digits of its SHA-256)."""
    return hashlib.sha256(prompt.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Batch:
    """One batch of (prompt id, prompt, seed) jobs, as the evaluation generates it."""

    items: tuple[tuple[int, str, int], ...]

    @property
    def id(self) -> str:
        return config_hash([[pid, prompt_sha(text), seed] for pid, text, seed in self.items])

    def names(self) -> list[str]:
        """The record file name of each job, in batch order."""
        return [record_name(pid, seed, self.id) for pid, _, seed in self.items]

    def describe(self) -> list[list]:
        return [[pid, prompt_sha(text), seed] for pid, text, seed in self.items]


def record_name(prompt_id: int, seed: int, batch_id: str) -> str:
    return f"p{int(prompt_id):06d}_s{int(seed)}_{batch_id}.json"


def _host() -> str:
    return socket.gethostname().replace(".", "_").replace("/", "_") or "host"


def process_id() -> str:
    """This process, unique among every process that ever writes into a store."""
    return f"{_host()}-{os.getpid()}-{os.urandom(4).hex()}"


class BadRecord(ValueError):
    """A record file that is not a valid record for its path."""


def read_regular(path: Path, limit: int = MAX_BYTES) -> bytes:
    """The bytes of ``path`` if it is a regular file of at most ``limit`` bytes, else :class:`BadRecord`.

    A symbolic link, a FIFO, a device or a folder is refused without waiting on it
    (``O_NOFOLLOW | O_NONBLOCK``); :class:`FileNotFoundError` when it is absent."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise
    except OSError as err:
        if os.path.islink(path):
            raise BadRecord("a symbolic link, not a file") from None
        raise BadRecord(f"unreadable ({err.strerror or err})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise BadRecord("a folder, not a file" if stat.S_ISDIR(info.st_mode) else "not a regular file")
        if info.st_size > limit:
            raise BadRecord(f"{info.st_size} bytes, more than a store file holds ({limit})")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(limit + 1)
    finally:
        os.close(fd)


def read_json(path: Path, limit: int = MAX_BYTES) -> Any:
    """JSON from a regular file (:func:`read_regular`); :class:`BadRecord` for anything that is not."""
    data = read_regular(path, limit)
    try:
        return json.loads(data.decode())
    except RecursionError:
        raise BadRecord("nested too deeply to be a store file") from None
    except ValueError as err:  # JSON and UTF-8 decoding errors
        raise BadRecord(f"not valid JSON ({err.__class__.__name__}: {err})") from None


def _number(record: dict, key: str, where: str = "") -> float:
    value = record.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise BadRecord(f"'{where}{key}' missing or not a number")
    try:
        value = float(value)
    except OverflowError:
        raise BadRecord(f"'{where}{key}' is out of range") from None
    if not math.isfinite(value):
        raise BadRecord(f"'{where}{key}' is {value}")
    return value


def check_record(path: Path, record: Any) -> None:
    """Raise :class:`BadRecord` unless ``record`` is a record whose fields agree with ``path``."""
    if not isinstance(record, dict):
        raise BadRecord("not a JSON object")
    for key, kind in (
        ("prompt_id", int),
        ("seed", int),
        ("prompt", str),
        ("prompt_sha", str),
        ("key", str),
        ("batch", list),
        ("setup", dict),
        ("metrics", dict),
        ("process", str),
    ):
        if key not in record:
            raise BadRecord(f"no '{key}'")
        if not isinstance(record[key], kind) or isinstance(record[key], bool):
            raise BadRecord(f"'{key}' is not {kind.__name__}")
    for key in NUMBERS:
        value = _number(record, key)
        if value < 0 or (value == 0 and key in POSITIVE):
            raise BadRecord(f"'{key}' is {value}, not {'> 0' if key in POSITIVE else '>= 0'}")
    for name in record["metrics"]:
        _number(record["metrics"], name, "metrics.")
    if record["key"] != path.parent.name:
        raise BadRecord(f"its key {record['key']} is not its folder's")
    if prompt_sha(record["prompt"]) != record["prompt_sha"]:
        raise BadRecord("its prompt does not match its prompt_sha")
    entry = [record["prompt_id"], record["prompt_sha"], record["seed"]]
    if entry not in record["batch"] or config_hash(record["batch"]) != path.name[-17:-5]:
        raise BadRecord("its batch does not match its file name")
    if record_name(record["prompt_id"], record["seed"], config_hash(record["batch"])) != path.name:
        raise BadRecord("its prompt id or seed does not match its file name")


class ResultStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.process = process_id()
        self.clean_temporary()

    # -- strategies ----------------------------------------------------------------
    def register_strategy(self, key: str, info: dict[str, Any]) -> None:
        """Remember what a strategy hash stands for (label, selector config, model, sampler)."""
        path = self.path(key, "strategy.json")
        path.parent.mkdir(exist_ok=True)
        try:
            read_json(path)
        except FileNotFoundError:
            _atomic_write(path, info)
        except BadRecord as err:
            self.reject(path, str(err))
            _atomic_write(path, info)

    # -- records -------------------------------------------------------------------
    def path(self, key: str, name: str) -> Path:
        """``<store>/<key>/<name>``; a key that is not a strategy hash could name a path elsewhere: refused."""
        if not HASH.fullmatch(str(key)) or "/" in name or name.startswith("."):
            raise ValueError(f"not a store entry: {key!r}/{name!r}")
        return self.root / key / name

    def load(self, key: str, name: str, then: str = "it will be recomputed") -> dict[str, Any] | None:
        """The valid record at ``<key>/<name>``, or ``None``: absent, or invalid (then set aside with one warning)."""
        path = self.path(key, name)
        try:
            if path.parent.is_symlink():  # O_NOFOLLOW guards the file, not its folder
                raise BadRecord("its strategy folder is a symbolic link")
            record = read_json(path)
            check_record(path, record)
        except FileNotFoundError:
            return None
        except BadRecord as err:
            self.reject(path, str(err), then)
            return None
        return record

    def has(self, key: str, name: str) -> bool:
        return self.load(key, name) is not None

    def put(self, key: str, record: dict[str, Any]) -> None:
        name = record_name(record["prompt_id"], record["seed"], config_hash(record["batch"]))
        _atomic_write(self.path(key, name), record)

    def record_files(self) -> list[Path]:
        """Every record file in the store, of any configuration."""
        return sorted(p for p in self.root.glob("*/p*.json") if p.parent.name not in ("rejected", "claims"))

    def reject(self, path: Path, reason: str, then: str = "it will be recomputed") -> None:
        """Move a bad file to ``<store>/rejected/`` (never deleted) and say so in one line."""
        if self.root.resolve() not in path.parent.resolve().parents:
            log.warning("catlab: bad store file %s: %s; outside the store, left where it is", path, reason)
            return
        dest = self.root / "rejected" / path.parent.name / path.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        n = 1
        while dest.exists():
            dest = dest.with_name(f"{path.name}.{n}")
            n += 1
        try:
            os.replace(path, dest)
        except FileNotFoundError:
            return  # another process set it aside first
        log.warning("catlab: bad store record %s: %s; moved to %s, %s", path, reason, dest, then)

    # -- timings -------------------------------------------------------------------
    def put_timing(self, key: str, batch: Batch, seconds: float) -> None:
        """One batch of ``key`` timed by this process (the speed-ups pair these by batch and process)."""
        folder = self.root / key / "timings"
        folder.mkdir(parents=True, exist_ok=True)
        _atomic_write(
            folder / f"{batch.id}_{self.process}.json",
            {"batch": batch.id, "process": self.process, "seconds": float(seconds), "images": len(batch.items)},
        )

    def timings(self, key: str) -> dict[tuple[str, str], float]:
        """``{(batch id, process): seconds}`` of every valid timing of ``key``."""
        out = {}
        folder = self.path(key, "timings")
        if folder.is_symlink() or folder.parent.is_symlink():
            return out
        for p in sorted(folder.glob("*.json")):
            try:
                t = read_json(p)
                if not isinstance(t, dict):
                    raise BadRecord("not a JSON object")
                entry = (str(t.get("batch")), str(t.get("process")))
                seconds = _number(t, "seconds")
                if p.name != f"{entry[0]}_{entry[1]}.json" or not seconds > 0:
                    raise BadRecord("its fields do not match its name, or its seconds are not > 0")
            except FileNotFoundError:
                continue
            except BadRecord as err:
                self.reject(p, f"not a timing: {err}", "it is not used")
                continue
            out[entry] = seconds
        return out

    # -- claims --------------------------------------------------------------------
    def claim(self, batch: Batch, force: bool = False) -> bool:
        """Take ``batch`` for this process; ``False`` while another live process holds it (``force``: take it)."""
        folder = self.root / "claims"
        folder.mkdir(exist_ok=True)
        path = folder / f"{batch.id}.claim"
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if not force and self.holder(batch) is not None:
                    return False
                if not force:
                    log.info("batch %s: its claim names no live process (killed, or a reused pid): taken", batch.id)
                _unlink_entry(path)  # its process is gone (killed), or waited for too long: take the batch over
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self._claim_info()))
            return True
        return False

    def holder(self, batch: Batch) -> str | None:
        """Who holds ``batch``: a description of the other live process, or ``None``."""
        path = self.root / "claims" / f"{batch.id}.claim"
        try:
            age = time.time() - path.lstat().st_mtime
            info = read_json(path, 4096)
        except FileNotFoundError:
            return None
        except BadRecord as err:
            if "JSON" in str(err) and age < 5:
                return "a process writing its claim"  # being written right now
            return None
        if not isinstance(info, dict) or info.get("process") == self.process:
            return None
        who = f"process {info.get('process')!s:.80} (host {info.get('host')!s:.40}, pid {info.get('pid')!s:.12})"
        if info.get("host") == _host():
            pid = info.get("pid")
            if not isinstance(pid, int) or isinstance(pid, bool) or not _alive(pid):
                return None
            started = _started(pid)
            # a pid is reused: the claim is that process's only if it also names the process's start time
            return who if started is None or info.get("started") == started else None
        return who if age < CLAIM_SECONDS else None

    def claimed(self, batch: Batch) -> bool:
        """Whether another live process holds ``batch``."""
        return self.holder(batch) is not None

    def release(self, batch: Batch) -> None:
        _unlink_entry(self.root / "claims" / f"{batch.id}.claim")

    def _claim_info(self) -> dict[str, Any]:
        return {"host": _host(), "pid": os.getpid(), "started": _started(os.getpid()), "process": self.process}

    # -- housekeeping --------------------------------------------------------------
    def clean_temporary(self) -> int:
        """Remove temporary files whose writer is gone (dead on this host, or older than an hour)."""
        removed = clean_temporary(self.root, recursive=True)
        if removed:
            log.info("removed %d stale temporary file(s) from %s", removed, self.root)
        return removed


def clean_temporary(root: Path, recursive: bool = False) -> int:
    """Remove the temporary files (``.<name>.<host>.<pid>.tmp``) under ``root`` whose writer is gone.

    Gone: a process of this host that no longer runs, or any file older than :data:`STALE_SECONDS`.
    Links are not followed: only files inside ``root`` are ever removed."""
    removed, host, now = 0, _host(), time.time()
    for folder, dirs, files in os.walk(root):  # followlinks=False
        if not recursive:
            dirs.clear()
        for name in files:
            if not (name.startswith(".") and name.endswith(".tmp")):
                continue
            p = Path(folder) / name
            parts = name.rsplit(".", 3)  # .<name>.<host>.<pid>.tmp
            try:
                info = p.lstat()
                mine = len(parts) == 4 and parts[1] == host and parts[2].isdigit()
                if stat.S_ISREG(info.st_mode) and (
                    (mine and not _alive(int(parts[2]))) or now - info.st_mtime > STALE_SECONDS
                ):
                    p.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
    return removed


def _unlink_entry(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _started(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, from ``/proc``); ``None`` where that is unknown."""
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return int(fields[19])  # the 22nd field of the whole line: starttime
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temporary_name(path: Path) -> Path:
    """The temporary file :func:`atomic_write_bytes` writes ``path`` through (its host and pid tell who)."""
    return path.with_name(f".{path.name}.{_host()}.{os.getpid()}.tmp")


def atomic_write_bytes(path: Path, data: bytes | None = None, write=None) -> None:
    """Write ``path`` whole or not at all (``data``, or ``write(tmp_path)``); a failure leaves no temporary file."""
    tmp = temporary_name(path)
    try:
        if write is not None:
            write(tmp)
        else:
            tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException as err:
        _unlink_entry(tmp)
        if isinstance(err, OSError) and err.errno and err.filename in (str(tmp), tmp):
            raise OSError(err.errno, err.strerror, str(path)) from err  # named by the file it was for
        raise


def _atomic_write(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode())
