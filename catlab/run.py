"""``python -m catlab.run``: generate images with one model and one selection strategy.

Examples::

    python -m catlab.run selector=random
    python -m catlab.run selector=cat clusterer=kmeans selector.alpha=0.5
    python -m catlab.run -m selector=full,random          # one run directory per job
    python -m catlab.run selector=full stepcache=taylorseer stepcache.cache_interval=3
    python -m catlab.run selector=budget_schedule reuse=taylor   # full / forecast / pruned steps

Each run directory gets ``metrics.json`` (flat keys), ``images/`` (PNG) and
``config.yaml`` (the resolved config); a video model's run also ``videos/`` (a GIF per video,
its frames side by side in ``images/``).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

import catlab  # noqa: F401  (registers the built-in components)
from catlab import cli
from catlab.builders import (
    ConfigError,
    assemble,
    build_model,
    check_clusters,
    check_seeds,
    plain,
    sampler_config,
    set_threads,
)
from catlab.cli import check_writable, run_app, write_text
from catlab.config import check_groups, register_schema
from catlab.grid import grid_tokens
from catlab.loggers.video import log_samples, save_sample
from catlab.metrics.cost import cost_metrics
from catlab.progress import Progress
from catlab.registry import ComponentError, loggers, models, prompt_sets
from catlab.sampler import calibrate, generate
from catlab.strategy import Strategy, resolve_strategy

log = logging.getLogger("catlab")
register_schema()


def prepare(cfg: DictConfig):
    """Resolve the strategy (once: what is built, hashed and named all come from it) and check and build
    everything cheap, so a bad config fails before the model loads."""
    try:
        check_groups(cfg, ("model", "selector", "prompts", "logger"))
        sampler_cfg = sampler_config(cfg.sampler)
        strategy = resolve_strategy(cfg.selector, cfg)
        policy, parts = strategy.build(sampler_cfg)
        prompts = prompt_sets.build(plain(cfg.prompts)).load()
        logger = loggers.build(plain(cfg.logger))
        model_cfg = plain(cfg.model)
        models.get(model_cfg.get("name", ""))
        if cfg.num_images is not None and int(cfg.num_images) < 1:
            raise ConfigError(f"num_images must be >= 1 or null (one per prompt); got {cfg.num_images}")
        if int(cfg.batch_size) < 1:
            raise ConfigError(f"batch_size must be >= 1; got {cfg.batch_size}")
        num = int(cfg.num_images) if cfg.num_images is not None else len(prompts)
        check_seeds([int(cfg.seed), int(cfg.seed) + num - 1], "seed (image i uses seed + i)")
    except (ComponentError, TypeError, ValueError) as err:
        raise ConfigError(str(err)) from err
    return sampler_cfg, policy, prompts, logger, model_cfg, parts, strategy


def run_hash(strategy: Strategy, cfg: DictConfig) -> str:
    """Hash of what determines a run's images: the resolved strategy, model, sampler, prompts, seeds."""
    context = {k: plain(cfg.get(k)) for k in ("model", "sampler", "prompts", "seed", "num_images")}
    return strategy.key(context)


def sweep_group(cfg: DictConfig) -> str:
    """The W&B group: in a multirun the sweep itself (its directory, after the experiment name), so each sweep's
    jobs sit together and apart from another sweep's; else the experiment name."""
    if not HydraConfig.initialized():  # run() called from Python, not through Hydra's entry point
        return str(cfg.experiment_name)
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:
        sweep = Path(hc.sweep.dir)
        return f"{cfg.experiment_name}:{sweep.parent.name}/{sweep.name}"
    return str(cfg.experiment_name)


def run(cfg: DictConfig, run_dir: Path) -> dict[str, float]:
    sampler_cfg, policy, prompts, logger, model_cfg, parts, strategy = prepare(cfg)
    step_cache, config_hash = parts.step_cache, run_hash(strategy, cfg)
    check_writable(run_dir)  # a read-only or full folder fails here, before the model loads
    set_threads(cfg.threads)
    adapter = build_model(model_cfg)  # refuses a size the model cannot take
    check_clusters(policy, grid_tokens(adapter.grid))
    session = assemble(adapter.transformer, policy, parts, sampler_cfg)  # the one check of the composition
    num = int(cfg.num_images) if cfg.num_images is not None else len(prompts)
    jobs = [(prompts[i % len(prompts)], int(cfg.seed) + i) for i in range(num)]

    resolved = OmegaConf.to_container(cfg, resolve=True)
    write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    image_dir = run_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    cache_name = step_cache.name if step_cache is not None else None
    logger.start(
        run_dir,
        resolved,
        name=f"{policy.name}-a{policy.alpha:.3g}" + (f"+{cache_name}" if cache_name else ""),
        group=sweep_group(cfg),
        tags=[policy.name, model_cfg["name"], f"cfg-{config_hash}"] + ([cache_name] if cache_name else []),
    )

    progress = Progress(num, "generation", "images")  # a bar in a terminal, a line every 30 s when piped
    try:  # the logger ends whatever happens: a run that fails leaves no open W&B run writing into its folder
        traces, all_images = [], []
        start = time.perf_counter()
        for b in range(0, num, int(cfg.batch_size)):
            batch = jobs[b : b + int(cfg.batch_size)]
            prompts_b, seeds_b = [p for p, _ in batch], [s for _, s in batch]
            if step_cache is not None:
                calibrate(step_cache, adapter, prompts_b, seeds_b, sampler_cfg)  # once, on the first batch
            result = generate(adapter, session, prompts_b, seeds_b, sampler_cfg)
            traces.append(result.trace)
            all_images.append(result.images)
            if cfg.save_images:  # a PNG per image; a GIF per video (videos/) and its frames as a PNG
                for j, img in enumerate(result.images):
                    save_sample(img, run_dir, f"{b + j:05d}_seed{batch[j][1]}")
            progress.update(len(batch))
        wall = time.perf_counter() - start
        progress.close()

        metrics = {
            "config_hash": config_hash,
            "selector": policy.name,
            "stepcache": cache_name,
            "alpha": float(policy.alpha),
            "start_step": int(policy.start_step),
            "num_steps": sampler_cfg.num_steps,
            "model": model_cfg["name"],
            **cost_metrics(traces, wall),
        }
        write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")  # whole or absent: a sweep reads it
        logger.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        log_samples(logger, "samples", torch.cat(all_images)[:16], [p for p, _ in jobs[:16]])
    except BaseException:
        progress.close()
        logger.finish(failed=True)
        raise
    logger.finish()
    log.info(
        "%s: %.3g MACs/image (%.2fx fewer than the full model), %.2f s/image -> %s",
        policy.name + (f"+{cache_name}" if cache_name else ""),
        metrics["macs_per_image"],
        metrics["macs_ratio"],
        metrics["seconds_per_image"],
        run_dir,
    )
    return metrics


@hydra.main(version_base="1.3", config_path=str(cli.CONF), config_name="config")  # absolute: imported or run
def app(cfg: DictConfig) -> None:
    run_app(run, cfg)


def main(argv: list[str] | None = None) -> None:
    """The command line (``argv``: its arguments, default ``sys.argv[1:]``); any error is one ``catlab:`` line."""
    cli.main(app, argv, config_name="config")


if __name__ == "__main__":
    main()
