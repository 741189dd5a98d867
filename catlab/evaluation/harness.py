"""Evaluate a set of strategies on one model: cost, fidelity to the full model, alignment.

Every strategy sees the same prompts, seeds, batches and sampler settings, in
one process, so the speed-ups are measured against a full-model baseline timed
under the same conditions. The full model's images are the fidelity reference;
they are cached on disk and reused by every strategy (and every job of a sweep).
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from catlab.evaluation.reference import ReferenceCache
from catlab.metrics.base import Metric
from catlab.metrics.cost import cost_metrics
from catlab.models.base import ModelAdapter
from catlab.sampler import SamplerConfig, SampleResult, sample
from catlab.selection.base import Policy

log = logging.getLogger("catlab.evaluate")


@dataclass
class Job:
    """One image to generate: a prompt (with its metadata) and a seed."""

    index: int
    prompt: str
    seed: int
    meta: Any = None


def make_jobs(prompts: list[str], meta: list[Any] | None, seeds: list[int], num_prompts: int | None,
              subset_seed: int) -> list[Job]:
    """Every (prompt, seed) pair, on a seeded subset of the prompts."""
    order = list(range(len(prompts)))
    if num_prompts is not None and num_prompts < len(prompts):
        order = sorted(random.Random(subset_seed).sample(order, num_prompts))
    jobs = []
    for i in order:
        for s in seeds:
            jobs.append(Job(len(jobs), prompts[i], int(s), None if meta is None else meta[i]))
    return jobs


@dataclass
class StrategyResult:
    label: str
    policy: Policy
    images: torch.Tensor
    metrics: dict[str, float]
    results: list[SampleResult] = field(default_factory=list)


def generate(adapter: ModelAdapter, policy, jobs: list[Job], sampler: SamplerConfig, batch_size: int,
             warmup: bool = True, repeats: int = 1) -> tuple[torch.Tensor, list[SampleResult], float]:
    """All images of ``jobs``; the wall time is the best of ``repeats`` timed passes after a warm-up batch."""
    if warmup:
        first = jobs[:batch_size]
        sample(adapter, policy, [j.prompt for j in first], [j.seed for j in first], sampler)
    best, kept = float("inf"), None
    for _ in range(max(1, repeats)):
        results = []
        start = time.perf_counter()
        for b in range(0, len(jobs), batch_size):
            chunk = jobs[b:b + batch_size]
            results.append(sample(adapter, policy, [j.prompt for j in chunk], [j.seed for j in chunk], sampler))
        wall = time.perf_counter() - start
        if wall < best:
            best, kept = wall, results
    return torch.cat([r.images for r in kept]), kept, best


def score(metrics: list[Metric], images: torch.Tensor, reference: torch.Tensor | None, jobs: list[Job]) -> dict[str, float]:
    """Mean of each per-image metric; a reference-free metric also runs on the full model."""
    out = {}
    prompts, meta = [j.prompt for j in jobs], [j.meta for j in jobs]
    for m in metrics:
        if m.needs_reference and reference is None:
            continue
        out[m.name] = float(m(images, reference, prompts, meta).float().mean())
    return out


def full_reference(adapter, full_policy, jobs, sampler, batch_size, cache: ReferenceCache | None, warmup, repeats):
    """The full model's images (from the cache where present) and its timed run."""
    images, results, wall = generate(adapter, full_policy, jobs, sampler, batch_size, warmup, repeats)
    if cache is not None:
        for job, img in zip(jobs, images):
            cached = cache.get(job.prompt, job.seed)
            if cached is None:
                cache.put(job.prompt, job.seed, img)
            elif not torch.allclose(cached, img, atol=1e-4):
                log.warning("the cached reference for %r (seed %d) differs from this run's full model", job.prompt, job.seed)
    return images, results, wall


def evaluate_strategies(adapter: ModelAdapter, policies: list[tuple[str, Policy]], jobs: list[Job],
                        sampler: SamplerConfig, batch_size: int, metrics: list[Metric],
                        cache: ReferenceCache | None = None, warmup: bool = True, repeats: int = 1) -> list[StrategyResult]:
    """Run the full model first (reference and timing baseline), then each strategy; return one result each."""
    full_label, full_policy = policies[0]
    if full_policy.prunes:
        raise ValueError("the first strategy must be the full model (selector 'full')")
    ref_images, ref_results, ref_wall = full_reference(adapter, full_policy, jobs, sampler, batch_size, cache,
                                                       warmup, repeats)
    full_cost = cost_metrics([r.trace for r in ref_results], ref_wall)
    out = [StrategyResult(full_label, full_policy, ref_images, {**full_cost, "speedup": 1.0,
                                                                **score(metrics, ref_images, None, jobs)}, ref_results)]
    for label, policy in policies[1:]:
        log.info("evaluating %s", label)
        images, results, wall = generate(adapter, policy, jobs, sampler, batch_size, warmup, repeats)
        cost = cost_metrics([r.trace for r in results], wall)
        cost["speedup"] = full_cost["seconds_per_image"] / cost["seconds_per_image"]
        out.append(StrategyResult(label, policy, images, {**cost, **score(metrics, images, ref_images, jobs)}, results))
    return out
