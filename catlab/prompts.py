"""Prompt sets: where the prompts of a run or an evaluation come from.

Each set has ``load() -> list[str]`` and ``load_with_meta() -> (prompts, meta)``,
where ``meta`` carries per-prompt data a metric may need (the scene behind an
embedded-world caption, a PartiPrompts category) or is ``None``.
"""

from __future__ import annotations

import json
import logging
import os
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from catlab.embedded.world import heldout_scenes
from catlab.fileio import write_text
from catlab.registry import prompt_sets

log = logging.getLogger("catlab")


def cache_dir() -> Path:
    """catlab's cache root: ``$CATLAB_CACHE`` or ``~/.cache/catlab``."""
    return Path(os.environ.get("CATLAB_CACHE", Path.home() / ".cache" / "catlab")).expanduser()


class PromptSet:
    def load(self) -> list[str]:
        return self.load_with_meta()[0]

    def load_with_meta(self) -> tuple[list[str], list[Any] | None]:
        return self.load(), None


@prompt_sets.register("list")
@dataclass
class PromptList(PromptSet):
    """Prompts written in the config."""

    prompts: list[str] = field(default_factory=lambda: ["a red circle in the top left"])

    def load(self) -> list[str]:
        if not self.prompts:
            raise ValueError("prompts.prompts is empty")
        return [str(p) for p in self.prompts]


def text_lines(text: str, path: str, keep: str = "") -> list[str]:
    """``text`` split on newlines only (``\\n``, with ``\\r\\n`` too), each line stripped of control characters
    (a tab becomes a space unless ``keep`` holds it).

    ``str.splitlines`` would also split on vertical tabs, form feeds and the like,
    turning one prompt into two; those characters are dropped instead, with a
    warning naming the file and how many lines held one.
    """
    lines, touched = [], 0
    for line in text.split("\n"):
        line = line.removesuffix("\r")
        clean = "".join(
            ch if ch in keep else " " if ch == "\t" else ch
            for ch in line
            if ch in keep or ch == "\t" or unicodedata.category(ch) != "Cc"
        )
        touched += len(clean) != len(line)
        lines.append(clean)
    if touched:
        log.warning("prompts.path: %s: dropped control characters from %d line(s)", path, touched)
    return lines


def check_file(path) -> Path:
    """``path`` as a readable regular file, or a ValueError that says what is wrong with it."""
    if path in (None, "", "???"):
        raise ValueError("prompts.path is not set; give the file, e.g. prompts=file prompts.path=/path/to/prompts.txt")
    p = Path(str(path)).expanduser()
    if p.is_dir():
        raise ValueError(f"prompts.path: {str(path)!r} is a folder; give a prompts file (one prompt per line)")
    if p.exists() and not p.is_file():
        raise ValueError(f"prompts.path: {str(path)!r} is not a regular file (a device or a pipe); give a text file")
    if not p.exists():
        raise ValueError(f"prompts.path: no such file {str(path)!r}")
    return p


def _read_lines(path: str) -> list[str]:
    p = check_file(path)
    lines = [line.strip() for line in text_lines(p.read_text(), path)]
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise ValueError(
            f"prompts.path: {path!r} holds no prompts (one per line; blank lines and # comments are skipped)"
        )
    return prompts


@prompt_sets.register("file")
@dataclass
class PromptFile(PromptSet):
    """One prompt per line of a text file (blank lines and ``#`` comments skipped)."""

    path: str = ""

    def load(self) -> list[str]:
        return _read_lines(self.path)


@dataclass
class _HubPrompts(PromptSet):
    """A prompt set from the Hugging Face hub (with ``datasets``), a local file, or catlab's cache.

    Order of preference: ``path`` (a local .txt / .jsonl / .tsv file), the cached
    copy under ``$CATLAB_CACHE/prompts/``, then the hub, whose result is cached.
    """

    path: str | None = None
    dataset: str = ""
    split: str = "train"
    column: str = "Prompt"
    meta_column: str | None = None

    def load_with_meta(self):
        if self.path:
            return self._from_file(Path(self.path).expanduser())
        cached = cache_dir() / "prompts" / f"{self.registered_name}.jsonl"
        if cached.is_file():
            return self._from_file(cached)
        try:
            import datasets
        except ImportError as err:
            raise ValueError(
                f"prompts '{self.registered_name}': give prompts.path (a local file), or install "
                "'datasets' and go online once to cache it"
            ) from err
        rows = datasets.load_dataset(self.dataset, split=self.split)
        prompts = [self._text(r[self.column]) for r in rows]
        meta = [r[self.meta_column] for r in rows] if self.meta_column else None
        cached.parent.mkdir(parents=True, exist_ok=True)
        write_text(
            cached,
            "".join(
                json.dumps({"prompt": p, "meta": m}) + "\n" for p, m in zip(prompts, meta or [None] * len(prompts))
            ),
        )
        return prompts, meta

    @staticmethod
    def _text(value) -> str:
        return value[0] if isinstance(value, list) else str(value)

    def _from_file(self, p: Path):
        check_file(p)
        if p.suffix in (".jsonl", ".tsv") and not p.read_text().strip():
            raise ValueError(f"prompts.path: {str(p)!r} holds no prompts")
        if p.suffix == ".jsonl":
            rows = [json.loads(line) for line in p.read_text().split("\n") if line.strip()]
            meta = [r.get("meta") for r in rows]
            return [r["prompt"] for r in rows], (meta if any(m is not None for m in meta) else None)
        if p.suffix == ".tsv":
            rows = [
                line.rstrip("\r").split("\t")
                for line in text_lines(p.read_text(), str(p), keep="\t")[1:]
                if line.strip()
            ]
            return [r[0] for r in rows], [r[1] if len(r) > 1 else None for r in rows]
        return _read_lines(str(p)), None


@prompt_sets.register("partiprompts")
@dataclass
class PartiPrompts(_HubPrompts):
    """PartiPrompts (Yu et al. 2022): 1,632 prompts with categories."""

    dataset: str = "nateraw/parti-prompts"
    column: str = "Prompt"
    meta_column: str | None = "Category"


@prompt_sets.register("coco2017")
@dataclass
class COCO2017(_HubPrompts):
    """COCO 2017 validation captions, the first caption of each image."""

    dataset: str = "phiyodr/coco2017"
    split: str = "validation"
    column: str = "captions"


@prompt_sets.register("embedded_heldout")
@dataclass
class EmbeddedHeldout(PromptSet):
    """The embedded model's fixed held-out captions, each with the scene it describes."""

    n: int = 200
    seed: int | None = None

    def load_with_meta(self):

        kwargs = {} if self.seed is None else {"seed": self.seed}
        scenes, captions = heldout_scenes(self.n, **kwargs)
        return list(captions), list(scenes)


@prompt_sets.register("embedded_video_heldout")
@dataclass
class EmbeddedVideoHeldout(PromptSet):
    """The embedded video model's fixed held-out captions, each with the clip it describes
    (for the video probe, catlab.embedded.video_probe)."""

    n: int = 64
    seed: int = 0

    def load_with_meta(self):
        from catlab.embedded.video_world import heldout_clips

        clips, captions = heldout_clips(self.n, seed=self.seed)
        return list(captions), list(clips)
