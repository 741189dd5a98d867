"""The metric interfaces: one value per image (or per set of images), or a notice saying why it was skipped."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from catlab.registry import Named


@dataclass(frozen=True)
class Column:
    """How a metric shows in the report tables (:mod:`catlab.evaluation.report`).

    ``header``: the markdown table's header; ``fmt``: a cell's format; ``order``: its
    place among the metric columns, after the cost columns (alignment in the 10s,
    fidelity in the 20s, perceptual and distribution metrics in the 30s); ``always``:
    a table has the column even when no row measured it (its cells then read "–").
    The CSV's metric columns follow the same order.
    """

    header: str
    fmt: str = "{:.3f}"
    order: int = 100
    always: bool = False


@dataclass
class Metric(Named):
    """A per-image metric. ``needs_reference``: it compares against the full model's image.

    ``unavailable()`` returns a one-line reason when the metric cannot run here
    (missing weights, wrong model), so the harness skips it with a notice instead
    of crashing.
    """

    needs_reference = False
    higher_is_better = True
    #: its column in the report tables (``None``: the CSV lists it after the known columns, tables leave it out)
    column: ClassVar[Column | None] = None

    @classmethod
    def cell(cls, value: float | None) -> str:
        """A table cell for ``value`` ("–" when not measured)."""
        return "–" if value is None else cls.column.fmt.format(value)

    def unavailable(self, context: dict[str, Any]) -> str | None:
        return None

    def __call__(
        self, images: torch.Tensor, reference: torch.Tensor | None, prompts: list[str], meta: list[Any] | None
    ) -> torch.Tensor:
        raise NotImplementedError


@dataclass
class SetMetric(Metric):
    """A metric of a whole set of images against the full model's set (FID): one value per strategy.

    The evaluation computes it after every record is written, from the images it saved
    (``save_images``), pairing each strategy's image with the full model's of the same
    prompt and seed.
    """

    set_level = True
    needs_reference = True

    def compute(self, images: torch.Tensor, reference: torch.Tensor) -> float:
        raise NotImplementedError
