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
store opened on the same host removes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from catlab.evaluation.reference import config_hash

log = logging.getLogger("catlab.evaluate")

#: the numbers every record carries (type checked on read)
NUMBERS = ("macs", "full_macs", "selection_macs", "seconds", "denoise_seconds", "selection_seconds")
#: a temporary file older than this is stale even when its writer cannot be checked (another host)
STALE_SECONDS = 3600.0
#: a claim by a process on another host is honoured this long after it was made
CLAIM_SECONDS = 3600.0


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
        if not isinstance(record.get(key), (int, float)) or isinstance(record.get(key), bool):
            raise BadRecord(f"'{key}' missing or not a number")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in record["metrics"].values()):
        raise BadRecord("a metric is not a number")
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
        folder = self.root / key
        folder.mkdir(exist_ok=True)
        path = folder / "strategy.json"
        try:
            json.loads(path.read_text())
        except FileNotFoundError:
            _atomic_write(path, info)
        except (OSError, ValueError) as err:
            self.reject(path, f"not JSON ({err.__class__.__name__})")
            _atomic_write(path, info)

    # -- records -------------------------------------------------------------------
    def path(self, key: str, name: str) -> Path:
        return self.root / key / name

    def load(self, key: str, name: str, then: str = "it will be recomputed") -> dict[str, Any] | None:
        """The valid record at ``<key>/<name>``, or ``None``: absent, or invalid (then set aside with one warning)."""
        path = self.path(key, name)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            record = json.loads(data.decode())
            check_record(path, record)
        except ValueError as err:  # BadRecord, JSON and UTF-8 decoding errors
            reason = str(err) if isinstance(err, BadRecord) else f"not valid JSON ({err.__class__.__name__}: {err})"
            self.reject(path, reason, then)
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
        for p in sorted((self.root / key / "timings").glob("*.json")):
            try:
                t = json.loads(p.read_text())
                entry = (str(t["batch"]), str(t["process"]))
                seconds = float(t["seconds"])
                if p.name != f"{entry[0]}_{entry[1]}.json" or not seconds > 0:
                    raise ValueError("fields do not match its name")
            except (OSError, ValueError, KeyError, TypeError) as err:
                self.reject(p, f"not a timing ({err.__class__.__name__})", "it is not used")
                continue
            out[entry] = seconds
        return out

    # -- claims --------------------------------------------------------------------
    def claim(self, batch: Batch) -> bool:
        """Take ``batch`` for this process; ``False`` while another live process holds it."""
        folder = self.root / "claims"
        folder.mkdir(exist_ok=True)
        path = folder / f"{batch.id}.claim"
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if self._live_claim(path):
                    return False
                try:
                    path.unlink()  # its process is gone (killed): take the batch over
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps({"host": _host(), "pid": os.getpid(), "process": self.process}))
            return True
        return False

    def claimed(self, batch: Batch) -> bool:
        """Whether another live process holds ``batch``."""
        path = self.root / "claims" / f"{batch.id}.claim"
        return path.exists() and self._live_claim(path)

    def release(self, batch: Batch) -> None:
        try:
            (self.root / "claims" / f"{batch.id}.claim").unlink()
        except FileNotFoundError:
            pass

    def _live_claim(self, path: Path) -> bool:
        try:
            info = json.loads(path.read_text())
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return False
        except ValueError:
            return time.time() - path.stat().st_mtime < 5  # being written right now
        if info.get("process") == self.process:
            return False
        if info.get("host") == _host():
            return _alive(int(info.get("pid", -1)))
        return age < CLAIM_SECONDS

    # -- housekeeping --------------------------------------------------------------
    def clean_temporary(self) -> int:
        """Remove temporary files whose writer is gone (dead on this host, or older than an hour)."""
        removed = 0
        host = _host()
        for p in self.root.glob("**/.*.tmp"):
            parts = p.name.rsplit(".", 3)  # .<name>.<host>.<pid>.tmp
            try:
                mine = len(parts) == 4 and parts[1] == host
                stale = (mine and not _alive(int(parts[2]))) or time.time() - p.stat().st_mtime > STALE_SECONDS
                if stale:
                    p.unlink()
                    removed += 1
            except (ValueError, FileNotFoundError):
                continue
        if removed:
            log.info("removed %d stale temporary file(s) from %s", removed, self.root)
        return removed


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


def _atomic_write(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{_host()}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)
