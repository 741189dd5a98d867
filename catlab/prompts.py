"""Prompt sets: where the prompts of a run come from."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from catlab.registry import prompt_sets


@prompt_sets.register("list")
@dataclass
class PromptList:
    """Prompts written in the config."""

    prompts: list[str] = field(default_factory=lambda: ["a red circle in the top left"])

    def load(self) -> list[str]:
        if not self.prompts:
            raise ValueError("prompts.prompts is empty")
        return [str(p) for p in self.prompts]


@prompt_sets.register("file")
@dataclass
class PromptFile:
    """One prompt per line of a text file (blank lines and ``#`` comments skipped)."""

    path: str = ""

    def load(self) -> list[str]:
        p = Path(self.path).expanduser()
        if not p.is_file():
            raise ValueError(f"prompts.path: no such file {self.path!r}")
        lines = [line.strip() for line in p.read_text().splitlines()]
        return [line for line in lines if line and not line.startswith("#")]
