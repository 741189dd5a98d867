"""Evaluate strategies on one model, one batch of images at a time, into a results store.

Every strategy sees the same prompts, seeds, batches and sampler settings, in
the same process, after a warm-up batch, so the speed-ups are measured against
a full-model baseline timed under the same conditions. The full model's images
are the fidelity reference, cached on disk and shared by every strategy, job
and rank. Each finished image becomes one record in the :class:`ResultStore`;
what is already there is skipped, so an interrupted evaluation resumes.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from catlab.evaluation.reference import ReferenceCache
from catlab.evaluation.store import ResultStore
from catlab.loggers.base import from_pil, to_pil
from catlab.metrics.base import Metric
from catlab.models.base import ModelAdapter
from catlab.sampler import SampleResult, SamplerConfig, StepReuse, calibrate, sample
from catlab.selection.base import Policy

log = logging.getLogger("catlab.evaluate")


@dataclass
class Job:
    """One image to generate: a prompt (with its metadata) and a seed."""

    prompt_id: int
    prompt: str
    seed: int
    meta: Any = None


@dataclass
class Strategy:
    """A selector to evaluate, with its label and the hash that keys its records."""

    label: str
    policy: Policy
    key: str
    spec: dict
    #: the reuse rule for unselected tokens (None: stale copies)
    reuse: Any = None
    #: a diffusers step cache (catlab.stepcache) applied around the strategy's steps
    step_cache: Any = None

    @property
    def reuse_parts(self) -> StepReuse:
        """What the sampler needs besides the policy: the reuse rule and the step cache."""
        return StepReuse(self.reuse, step_cache=self.step_cache)

    @property
    def exact(self) -> bool:
        """Whether its images are the full model's (then they serve as the references)."""
        return not self.policy.prunes and self.step_cache is None


def make_jobs(prompts: list[str], meta: list[Any] | None, seeds: list[int], num_prompts: int | None,
              subset_seed: int) -> list[Job]:
    """Every (prompt, seed) pair, on a seeded subset of the prompts; ids are positions in the prompt set."""
    order = list(range(len(prompts)))
    if num_prompts is not None and num_prompts < len(prompts):
        order = sorted(random.Random(subset_seed).sample(order, num_prompts))
    return [Job(i, prompts[i], int(s), None if meta is None else meta[i]) for i in order for s in seeds]


def _chunks(items: list, size: int):
    for b in range(0, len(items), size):
        yield items[b:b + size]


def timed_sample(adapter, strategy: "Strategy", jobs: list[Job], sampler: SamplerConfig,
                 repeats: int) -> tuple[SampleResult, float]:
    """One batch, timed; with ``repeats`` > 1 the best of several identical passes."""
    best, kept = float("inf"), None
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        result = sample(adapter, strategy.policy, [j.prompt for j in jobs], [j.seed for j in jobs], sampler,
                        strategy.reuse_parts)
        wall = time.perf_counter() - start
        if wall < best:
            best, kept = wall, result
    return kept, best


class References:
    """The full model's images for any jobs: from the on-disk cache, or generated and cached."""

    def __init__(self, cache: ReferenceCache, adapter: ModelAdapter, full: Policy, sampler: SamplerConfig):
        self.cache, self.adapter, self.full, self.sampler = cache, adapter, full, sampler

    def get(self, jobs: list[Job]) -> torch.Tensor:
        images = [self.cache.get(j.prompt, j.seed) for j in jobs]
        missing = [j for j, img in zip(jobs, images) if img is None]
        if missing:
            fresh = sample(self.adapter, self.full, [j.prompt for j in missing], [j.seed for j in missing], self.sampler)
            for j, img in zip(missing, fresh.images):
                self.cache.put(j.prompt, j.seed, img)
            images = [self.cache.get(j.prompt, j.seed) for j in jobs]
        return torch.stack(images)

    def put(self, jobs: list[Job], images: torch.Tensor) -> None:
        for j, img in zip(jobs, images):
            if self.cache.get(j.prompt, j.seed) is None:
                self.cache.put(j.prompt, j.seed, img)


def _record_batch(adapter: ModelAdapter, strategy: Strategy, chunk: list[Job], sampler: SamplerConfig,
                  metrics: list[Metric], store: ResultStore, references: References, repeats: int,
                  image_dir: Path | None) -> None:
    """Generate one batch with ``strategy``, score it, and write one record per image."""
    result, wall = timed_sample(adapter, strategy, chunk, sampler, repeats)
    images = result.images
    reference = None
    if strategy.exact:
        references.put(chunk, images)
    elif any(m.needs_reference and not getattr(m, "set_level", False) for m in metrics):
        reference = references.get(chunk)
    values = {}
    for m in metrics:
        if getattr(m, "set_level", False) or (m.needs_reference and reference is None):
            continue  # set-level metrics are computed once per strategy, after every record
        values[m.name] = m(images, reference, [j.prompt for j in chunk], [j.meta for j in chunk]).float()
    trace, n = result.trace, len(chunk)
    for i, job in enumerate(chunk):
        store.put(strategy.key, {
            "prompt_id": job.prompt_id, "seed": job.seed, "prompt": job.prompt, "label": strategy.label,
            "macs": (trace.macs) / n, "full_macs": trace.full_macs / n,
            "selection_macs": sum(s.selection_macs for s in trace.steps) / n,
            "seconds": wall / n, "denoise_seconds": trace.seconds / n,
            "selection_seconds": trace.selection_seconds / n, "graphed": trace.graphed,
            **({"graph_counts": trace.graph_counts} if trace.graph_counts else {}),
            "metrics": {k: float(v[i]) for k, v in values.items()},
        })
        if image_dir is not None:
            d = image_dir / strategy.label
            d.mkdir(parents=True, exist_ok=True)
            to_pil(images[i]).save(d / f"p{job.prompt_id:06d}_s{job.seed}.png")


def evaluate_strategies(adapter: ModelAdapter, strategies: list[Strategy], jobs: list[Job], sampler: SamplerConfig,
                        batch_size: int, metrics: list[Metric], store: ResultStore, references: References,
                        warmup: bool = True, repeats: int = 1,
                        image_dir: Path | None = None) -> dict[str, SampleResult | None]:
    """Write every record the store lacks; return each strategy's warm-up result (``None`` if nothing to do).

    The strategies take turns on each batch (the full model first, so its images
    are the references), so a change of load on a shared machine during the run
    affects every strategy alike instead of whichever ran at that moment.
    """
    pending = {s.key: [j for j in jobs if not store.has(s.key, j.prompt_id, j.seed)] for s in strategies}
    warm = {}
    for s in strategies:
        if len(pending[s.key]) < len(jobs):
            log.info("%s: %d of %d records already in the store", s.label, len(jobs) - len(pending[s.key]), len(jobs))
        first = pending[s.key][:batch_size]
        prompts, seeds = [j.prompt for j in first], [j.seed for j in first]
        if s.step_cache is not None and first:
            calibrate(s.step_cache, adapter, prompts, seeds, sampler)  # a cache that needs it, on the first batch
        warm[s.label] = sample(adapter, s.policy, prompts, seeds, sampler, s.reuse_parts) if warmup and first else None
    for chunk in _chunks(jobs, batch_size):
        for s in strategies:
            todo = [j for j in chunk if not store.has(s.key, j.prompt_id, j.seed)]
            if todo:
                _record_batch(adapter, s, todo, sampler, metrics, store, references, repeats, image_dir)
    return warm


def set_metrics(rows: list[dict], metrics: list[Metric], image_dir: Path | None) -> None:
    """Add each set-level metric (FID) to every row but the full model's, from the saved images.

    A strategy's image pairs with the full model's image of the same prompt and seed
    (the same file name); only pairs present for both enter. Without saved images the
    metric is skipped with a notice.
    """
    metrics = [m for m in metrics if getattr(m, "set_level", False)]
    if not metrics:
        return
    if image_dir is None:
        log.warning("skipped metric — %s: needs the saved images (save_images=true)", ", ".join(m.name for m in metrics))
        return
    reference_dir = image_dir / "full"
    for row in rows:
        if row["method"] == "full" or not (image_dir / row["method"]).is_dir():
            continue
        names = sorted(p.name for p in (image_dir / row["method"]).glob("*.png") if (reference_dir / p.name).exists())
        if not names:
            continue
        images = torch.stack([from_pil(Image.open(image_dir / row["method"] / n)) for n in names])
        reference = torch.stack([from_pil(Image.open(reference_dir / n)) for n in names])
        for m in metrics:
            row[m.name] = m.compute(images, reference)
