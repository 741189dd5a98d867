"""Evaluate strategies on one model, one batch of images at a time, into a results store.

Every strategy sees the same prompts, seeds, batches and sampler settings, in
the same process, after a warm-up batch, so the speed-ups are measured against
a full-model baseline timed under the same conditions. The full model's images
are the fidelity reference, cached on disk and shared by every strategy, job
and rank. Each finished image becomes one record in the :class:`ResultStore`,
keyed by the batch it was made in; what is already there is skipped, so an
interrupted evaluation resumes and gives the table an uninterrupted one gives.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from catlab.evaluation import store as store_module
from catlab.evaluation.reference import ReferenceCache
from catlab.evaluation.store import Batch, ResultStore, prompt_sha
from catlab.hashing import folder_name
from catlab.loggers.base import from_pil
from catlab.loggers.video import save_evaluated
from catlab.metrics.base import Metric
from catlab.models.base import ModelAdapter
from catlab.progress import Progress
from catlab.sampler import SamplerConfig, SampleResult, StepReuse, calibrate, sample
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
class EvaluatedStrategy:
    """A resolved strategy (:class:`catlab.strategy.Strategy`) as an evaluation runs it: its built policy and
    parts, its label and the hash that keys its records."""

    label: str
    policy: Policy
    key: str
    spec: dict
    #: what the sampler needs besides the policy: the reuse rule for unselected tokens' outputs, the one
    #: for their K/V, and a diffusers step cache (catlab.stepcache) around the strategy's steps
    reuse_parts: StepReuse = field(default_factory=StepReuse)

    @property
    def folder(self) -> str:
        """The name of its files and folders (its saved images: ``images/<folder>/``)."""
        return folder_name(self.label, self.key)

    @property
    def step_cache(self):
        return self.reuse_parts.step_cache

    @property
    def exact(self) -> bool:
        """Whether its images are the full model's (then they serve as the references)."""
        return not self.policy.prunes and self.step_cache is None


def record_metrics(strategy: EvaluatedStrategy, metrics: list[Metric]) -> list[str]:
    """The metrics every record of ``strategy`` carries: the per-image ones (the full model's lack those that
    compare with it). A stored record that lacks one was made with another ``metrics`` list: it is computed again."""
    per_image = [m for m in metrics if not getattr(m, "set_level", False)]
    return [m.name for m in per_image if not (m.needs_reference and strategy.exact)]


def make_jobs(
    prompts: list[str], meta: list[Any] | None, seeds: list[int], num_prompts: int | None, subset_seed: int
) -> list[Job]:
    """Every (prompt, seed) pair, on a seeded subset of the prompts; ids are positions in the prompt set."""
    order = list(range(len(prompts)))
    if num_prompts is not None and num_prompts < len(prompts):
        order = sorted(random.Random(subset_seed).sample(order, num_prompts))
    return [Job(i, prompts[i], int(s), None if meta is None else meta[i]) for i in order for s in seeds]


def _chunks(items: list, size: int):
    for b in range(0, len(items), size):
        yield items[b : b + size]


def make_batches(jobs: list[Job], batch_size: int) -> list[tuple[Batch, list[Job]]]:
    """``jobs`` in batches of ``batch_size``, in order: the batches a process generates (and records are keyed by)."""
    return [
        (Batch(tuple((j.prompt_id, j.prompt, j.seed) for j in chunk)), chunk) for chunk in _chunks(jobs, batch_size)
    ]


def layout(jobs: list[Job], batch_size: int, world: int = 1) -> list[Batch]:
    """Every batch of an evaluation sharded over ``world`` ranks (rank r takes ``jobs[r::world]``)."""
    return [b for rank in range(world) for b, _ in make_batches(jobs[rank::world], batch_size)]


def timed_sample(
    adapter, strategy: EvaluatedStrategy, jobs: list[Job], sampler: SamplerConfig, repeats: int
) -> tuple[SampleResult, float]:
    """One batch, timed; with ``repeats`` > 1 the best of several identical passes."""
    best, kept = float("inf"), None
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        result = sample(
            adapter, strategy.policy, [j.prompt for j in jobs], [j.seed for j in jobs], sampler, strategy.reuse_parts
        )
        wall = time.perf_counter() - start
        if wall < best:
            best, kept = wall, result
    return kept, best


class References:
    """The full model's images of a batch: from the on-disk cache, or generated (the whole batch) and cached."""

    def __init__(self, cache: ReferenceCache, adapter: ModelAdapter, full: Policy, sampler: SamplerConfig):
        self.cache, self.adapter, self.full, self.sampler = cache, adapter, full, sampler

    def get(self, batch: Batch, jobs: list[Job], shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """The batch's reference images; ``shape``: one image's, which a cached entry must have."""
        images = [self.cache.get(j.prompt, j.seed, batch.id, shape) for j in jobs]
        if any(img is None for img in images):
            images = sample(
                self.adapter, self.full, [j.prompt for j in jobs], [j.seed for j in jobs], self.sampler
            ).images
            self.put(batch, jobs, images)
        return torch.stack(list(images))

    def put(self, batch: Batch, jobs: list[Job], images: torch.Tensor) -> None:
        for j, img in zip(jobs, images):
            if self.cache.get(j.prompt, j.seed, batch.id, tuple(img.shape)) is None:
                self.cache.put(j.prompt, j.seed, img, batch.id)


class _Run:
    """One process's part of an evaluation: which batches it computes, times and records."""

    def __init__(
        self,
        adapter,
        strategies,
        sampler,
        metrics,
        store,
        references,
        warmup,
        repeats,
        image_dir,
        retime_batches,
        setup,
    ):
        self.adapter, self.strategies, self.sampler, self.metrics = adapter, strategies, sampler, metrics
        self.store, self.references, self.warmup, self.repeats = store, references, warmup, repeats
        self.image_dir, self.retime_batches, self.setup = image_dir, retime_batches, setup or {}
        self.full = strategies[0]
        self.needs = {s.key: set(record_metrics(s, metrics)) for s in strategies}
        self.warm: dict[str, SampleResult | None] = {s.label: None for s in strategies}
        self.paired: dict[str, set[str]] = {s.key: set() for s in strategies[1:]}
        self.warmed: set[str] = set()
        self.retimed = 0  # batches timed only for a speed-up pair (their records were already there)
        self.progress: Progress | None = None  # strategies × batches, advanced as each strategy ends a batch

    # -- what a batch needs ---------------------------------------------------------
    def has(self, s: EvaluatedStrategy, name: str, lacking: list | None = None) -> bool:
        """Whether the store holds a valid record ``name`` of ``s`` with every metric this run computes."""
        record = self.store.load(s.key, name)
        if record is None:
            return False
        if self.needs[s.key] <= record["metrics"].keys():
            return True
        if lacking is not None:
            lacking.append(self.needs[s.key] - record["metrics"].keys())
        return False

    def refresh_pairs(self, key: str) -> None:
        """Batches where ``key`` and the full model were timed by one process (any process, from the store)."""
        full = self.store.timings(self.full.key)
        self.paired[key] |= {b for (b, p) in self.store.timings(key) if (b, p) in full}

    def work(self, batch: Batch) -> tuple[dict[str, list[int]], list[EvaluatedStrategy]]:
        """(each strategy's missing records as positions in the batch, the strategies to time on it)."""
        names = batch.names()
        missing = {s.key: [i for i, n in enumerate(names) if not self.has(s, n)] for s in self.strategies}
        timed, wants_pair = [], False
        for s in self.strategies[1:]:
            short = len(self.paired[s.key]) < self.retime_batches and batch.id not in self.paired[s.key]
            if short:
                self.refresh_pairs(s.key)
                short = len(self.paired[s.key]) < self.retime_batches and batch.id not in self.paired[s.key]
            if missing[s.key] or short:
                timed.append(s)
                wants_pair |= short
        if missing[self.full.key] or wants_pair:
            timed.insert(0, self.full)
        return missing, timed

    # -- doing it -------------------------------------------------------------------
    def run(self, plan: list[tuple[Batch, list[Job]]], wait: float) -> None:
        """Every batch of ``plan`` this process can take; then wait for those other processes hold.

        A wait is logged once per batch, naming the holder; after :data:`~catlab.evaluation.store.CLAIM_SECONDS`
        the batch is taken over whoever holds it (a claim that outlives its use must not hang the evaluation)."""
        deferred = [(b, jobs) for b, jobs in plan if not self.attempt(b, jobs)]
        since = {b.id: time.monotonic() for b, _ in deferred}
        for b, _ in deferred:
            log.info("batch %s is held by %s; waiting for it", b.id, self.store.holder(b) or "another process")
        while deferred:
            time.sleep(wait)
            late = [b.id for b, _ in deferred if time.monotonic() - since[b.id] > store_module.CLAIM_SECONDS]
            for bid in late:
                log.warning(
                    "catlab: batch %s still held after %.0f s of waiting; taking it over",
                    bid,
                    store_module.CLAIM_SECONDS,
                )
            deferred = [(b, jobs) for b, jobs in deferred if not self.attempt(b, jobs, force=b.id in late)]

    def attempt(self, batch: Batch, jobs: list[Job], force: bool = False) -> bool:
        """Do what ``batch`` needs; ``False`` if another live process holds it (try again later)."""
        if not self.work(batch)[1]:
            self._advance(len(self.strategies))
            return True
        if not self.store.claim(batch, force):
            return False
        try:
            missing, timed = self.work(batch)  # again: the holder before us may have done it
            if timed:
                self.compute(batch, jobs, missing, timed)
            self._advance(len(self.strategies) - len(timed))  # those with nothing to do on this batch
        finally:
            self.store.release(batch)
        return True

    def _advance(self, n: int, note: str = "") -> None:
        if self.progress is not None:
            self.progress.update(n, note)

    def ready(self, s: EvaluatedStrategy, jobs: list[Job]) -> None:
        """Before a strategy's first timed batch in this process: calibrate its step cache, warm it up."""
        if s.key in self.warmed:
            return
        self.warmed.add(s.key)
        prompts, seeds = [j.prompt for j in jobs], [j.seed for j in jobs]
        if s.step_cache is not None:
            calibrate(s.step_cache, self.adapter, prompts, seeds, self.sampler)
        if self.warmup:
            self.warm[s.label] = sample(self.adapter, s.policy, prompts, seeds, self.sampler, s.reuse_parts)

    def compute(
        self, batch: Batch, jobs: list[Job], missing: dict[str, list[int]], timed: list[EvaluatedStrategy]
    ) -> None:
        full_images = None
        for s in timed:
            self.ready(s, jobs)
            result, wall = timed_sample(self.adapter, s, jobs, self.sampler, self.repeats)
            self.store.put_timing(s.key, batch, wall)
            self.retimed += not missing[s.key]
            if s is self.full:
                full_images = result.images
            elif full_images is not None:
                self.paired[s.key].add(batch.id)
            if s.exact:
                self.references.put(batch, jobs, result.images)
            if missing[s.key]:
                self.record(s, batch, jobs, missing[s.key], result, wall, full_images)
            self._advance(1, f"{s.label} ended batch {batch.id}")

    def record(
        self,
        s: EvaluatedStrategy,
        batch: Batch,
        jobs: list[Job],
        todo: list[int],
        result: SampleResult,
        wall: float,
        full_images: torch.Tensor | None,
    ) -> None:
        """Score one generated batch and write a record for each image in ``todo`` (positions in the batch)."""
        images, metrics = result.images, self.metrics
        reference = None
        if not s.exact and any(m.needs_reference and not getattr(m, "set_level", False) for m in metrics):
            reference = full_images if full_images is not None else self.references.get(batch, jobs, images.shape[1:])
        values = {}
        for m in metrics:
            if getattr(m, "set_level", False) or (m.needs_reference and reference is None):
                continue  # set-level metrics are computed once per strategy, after every record
            values[m.name] = m(images, reference, [j.prompt for j in jobs], [j.meta for j in jobs]).float()
        trace, n, described = result.trace, len(jobs), batch.describe()
        for i in todo:
            job = jobs[i]
            self.store.put(
                s.key,
                {
                    "key": s.key,
                    "prompt_id": job.prompt_id,
                    "seed": job.seed,
                    "prompt": job.prompt,
                    "prompt_sha": prompt_sha(job.prompt),
                    "batch": described,
                    "setup": self.setup,
                    "process": self.store.process,
                    "label": s.label,
                    "macs": trace.macs / n,
                    "full_macs": trace.full_macs / n,
                    "selection_macs": sum(st.selection_macs for st in trace.steps) / n,
                    "seconds": wall / n,
                    "denoise_seconds": trace.seconds / n,
                    "selection_seconds": trace.selection_seconds / n,
                    "graphed": trace.graphed,
                    **({"graph_counts": trace.graph_counts} if trace.graph_counts else {}),
                    "metrics": {k: float(v[i]) for k, v in values.items()},
                },
            )
            if self.image_dir is not None:
                save_evaluated(images[i], self.image_dir / s.folder, f"p{job.prompt_id:06d}_s{job.seed}")


def evaluate_strategies(
    adapter: ModelAdapter,
    strategies: list[EvaluatedStrategy],
    jobs: list[Job],
    sampler: SamplerConfig,
    batch_size: int,
    metrics: list[Metric],
    store: ResultStore,
    references: References,
    warmup: bool = True,
    repeats: int = 1,
    image_dir: Path | None = None,
    retime_batches: int = 2,
    setup: dict | None = None,
    wait: float = 0.2,
) -> dict[str, SampleResult | None]:
    """Write every record the store lacks; return each strategy's warm-up result (``None`` if it ran nothing).

    ``strategies[0]`` is the plain full model: its images are the references, its
    timings the speed-ups' baseline. The strategies take turns on each batch (the full
    model first), so a change of load on a shared machine during the run affects every
    strategy alike. A batch is claimed before it is computed, so processes sharing a
    store split the batches instead of repeating them; a batch another live process
    holds is waited for. Where the store holds fewer than ``retime_batches`` batches
    of a strategy timed beside the full model by one process, this process times both
    on more batches (records already there are kept; only timings are added).
    """
    run = _Run(
        adapter, strategies, sampler, metrics, store, references, warmup, repeats, image_dir, retime_batches, setup
    )
    plan = make_batches(jobs, batch_size)
    for s in strategies:
        lacking: list[set[str]] = []
        done = sum(run.has(s, name, lacking) for b, _ in plan for name in b.names())
        if 0 < done:
            log.info("%s: %d of %d records already in the store", s.label, done, len(jobs))
        if lacking:
            log.info(
                "%s: %d stored record(s) lack metric(s) %s (made with another metrics list): computed again",
                s.label,
                len(lacking),
                ", ".join(sorted(set().union(*lacking))),
            )
        if s is not run.full:
            run.refresh_pairs(s.key)
    with Progress(len(strategies) * len(plan), "evaluation", "strategy×batch") as run.progress:
        run.run(plan, wait)
    if run.retimed:
        log.info(
            "timed %d batch(es) again, whose records were already stored, for same-process speed-ups", run.retimed
        )
    return run.warm


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
        log.warning(
            "skipped metric — %s: needs the saved images (save_images=true)", ", ".join(m.name for m in metrics)
        )
        return
    full = next((r for r in rows if r["method"] == "full"), None)
    if full is None:
        return
    reference_dir = image_dir / folder_name(full["method"], full.get("key", ""))
    if any(reference_dir.glob("*.gif")):  # a video model's samples: its PNGs are frame strips, not images
        log.warning(
            "skipped metric — %s: a set of images; this model makes videos", ", ".join(m.name for m in metrics)
        )
        return
    for row in rows:
        folder = image_dir / folder_name(row["method"], row.get("key", ""))
        if row is full or not folder.is_dir():
            continue
        names = sorted(p.name for p in folder.glob("*.png") if (reference_dir / p.name).exists())
        if not names:
            continue
        images = torch.stack([from_pil(Image.open(folder / n)) for n in names])
        reference = torch.stack([from_pil(Image.open(reference_dir / n)) for n in names])
        for m in metrics:
            row[m.name] = m.compute(images, reference)
