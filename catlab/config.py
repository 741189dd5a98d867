"""The structured schema of ``python -m catlab.run``.

Hydra checks the top level and ``sampler`` against these dataclasses when it
composes the config, so a misspelt key fails before anything runs. Each
component group (``model``, ``selector``, ...) is a plain mapping with a
``name``; its registry checks the remaining keys against the component's own
dataclass fields when it is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore

from catlab.sampler import SamplerConfig


@dataclass
class _Setup:
    """What both apps share: the component groups, the sampler, and the CPU thread count."""

    model: Any = None
    prompts: Any = None
    logger: Any = None
    scorer: Any = None
    staleness: Any = None
    clusterer: Any = None
    pooling: Any = None
    #: what an unselected token's output becomes: copy (the paper's) or taylor (a forecast)
    reuse: Any = None
    #: what an unselected token's keys and values in each attention layer become, for the tokens that
    #: are computed (null: their cached K/V from the step they were last computed, the paper's); a reuse
    #: rule by name or mapping, e.g. kv=taylor or kv='{name: taylor, order: 2}'
    kv: Any = None
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    #: torch CPU threads (null: torch's default, one per core). 1 by default: on a shared CPU torch's default
    #: threads wait on each other whenever another process holds a core (14–20 s per image instead of 0.8 s,
    #: docs/performance.md), while one thread per process keeps per-image times stable. A dedicated
    #: many-core CPU runs faster with threads=null; a GPU run hardly uses CPU threads.
    threads: int | None = 1


@dataclass
class RunConfig(_Setup):
    """Schema of ``python -m catlab.run``: one model, one selector."""

    selector: Any = None
    #: a diffusers step-level cache (taylorseer, first_block_cache, mag_cache); null = none
    stepcache: Any = None
    #: seed of the first image; image i uses seed + i
    seed: int = 0
    #: images to generate (prompts are cycled); null = one per prompt
    num_images: int | None = None
    batch_size: int = 2
    save_images: bool = True
    #: free-form name of the experiment, used as the W&B group (``experiment=`` picks a whole setup
    #: from conf/experiment/, which sets this name too)
    experiment_name: str = "default"


def register_schema() -> None:
    ConfigStore.instance().store(name="catlab_schema", node=RunConfig)


@dataclass
class EvaluateConfig(_Setup):
    """Schema of ``python -m catlab.evaluate``: one model, many strategies, one table."""

    #: selectors to compare: names or mappings ({name: cat, alpha: 0.5}); "full" is added first if missing
    strategies: list[Any] = field(default_factory=lambda: ["full", "random"])
    #: when set, every pruning strategy runs once per alpha
    alphas: list[float] | None = None
    #: overrides applied to every pruning strategy (e.g. {start_step: 8})
    strategy_defaults: dict[str, Any] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    #: a seeded subset of the prompt set; null = every prompt
    num_prompts: int | None = 20
    subset_seed: int = 0
    batch_size: int = 4
    metrics: list[str] = field(default_factory=lambda: ["psnr", "ssim", "lpips", "clip_score", "attribute_accuracy"])
    warmup: bool = True
    repeats: int = 1
    #: a speed-up needs batches timed beside the full model by one process; where the store holds fewer
    #: than this many for a strategy (a resume after its setting changed), time both again on more batches
    #: (0: never; its speed-up then shows "–")
    retime_batches: int = 2
    #: reference images are cached here (default: $CATLAB_CACHE or ~/.cache/catlab)
    cache_dir: str | None = None
    #: per-image records (default: <run dir>/store); reruns skip what is there
    store_dir: str | None = None
    diagnostics: bool = True
    save_images: bool = True
    #: the W&B run and group name; each file in conf/experiment/ sets its own
    experiment_name: str = "evaluate"
    title: str = ""
    #: also write the quality frontier: each family's Pareto front, the overall front, the best strategy
    #: at fixed MACs ratios (catlab/evaluation/frontier.py)
    frontier: bool = False


def register_evaluate_schema() -> None:
    ConfigStore.instance().store(name="catlab_evaluate_schema", node=EvaluateConfig)


CONF = Path(__file__).resolve().parents[1] / "conf"


def group_options(group: str) -> list[str]:
    """The options of a config group: the YAML files of ``conf/<group>/``."""
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def check_groups(cfg, groups: tuple[str, ...]) -> None:
    """Refuse a component group that is not there (``~model``) or not a mapping with a ``name`` (a hand-made
    value), before anything is built: ``model is not set; choose one: model=<option> (options of model: ...)``."""
    for group in groups:
        node = cfg.get(group)
        name = node.get("name") if hasattr(node, "get") else None
        if not isinstance(name, str):
            what = "not set" if node is None else f"{node!r}, not a {group} config with a name"
            raise ValueError(
                f"{group} is {what}; choose one: {group}=<option> (options of {group}: "
                f"{', '.join(group_options(group)) or '(none)'})"
            )
