"""``python -m catlab.evaluate``: the paper's table for any set of strategies.

Examples::

    python -m catlab.evaluate                                   # full vs random on the default model
    python -m catlab.evaluate experiment=embedded_table2        # the committed table in docs/
    python -m catlab.evaluate 'strategies=[full,cat,random]' 'alphas=[0.2,0.3,0.5]'

Writes ``results.csv``, ``results.md``, ``cost_quality.png``, diagnostic
figures and sample images into the Hydra run directory.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

import catlab  # noqa: F401  (registers the built-in components)
from catlab.builders import ConfigError, build_selector, plain
from catlab.config import register_evaluate_schema
from catlab.evaluation import diagnostics, report
from catlab.evaluation.harness import evaluate_strategies, make_jobs
from catlab.evaluation.recorder import RecordingPolicy
from catlab.evaluation.reference import ReferenceCache
from catlab.loggers.base import image_grid, to_pil
from catlab.prompts import cache_dir
from catlab.registry import ComponentError, loggers, metrics, models, prompt_sets
from catlab.sampler import SamplerConfig

log = logging.getLogger("catlab.evaluate")
register_evaluate_schema()


def strategy_specs(cfg: DictConfig) -> list[dict]:
    """The strategies to run, as selector configs: full first, each pruning strategy once per alpha."""
    specs = []
    for s in plain(cfg.strategies):
        spec = {"name": s} if isinstance(s, str) else dict(s)
        if spec["name"] != "full":
            spec = {**plain(cfg.strategy_defaults), **spec}
        specs.append(spec)
    if not any(s["name"] == "full" for s in specs):
        specs.insert(0, {"name": "full"})
    specs.sort(key=lambda s: s["name"] != "full")
    if cfg.alphas:
        specs = [specs[0]] + [{**s, "alpha": float(a)} for s in specs[1:] for a in cfg.alphas]
    return specs


def label(spec: dict) -> str:
    extras = [f"{k}={v}" for k, v in spec.items() if k not in ("name", "alpha", "start_step") and not isinstance(v, dict)]
    return spec["name"] + (f"[{','.join(extras)}]" if extras else "")


def prepare(cfg: DictConfig):
    """Check and build everything cheap, before the model loads."""
    try:
        sampler_cfg = SamplerConfig(**plain(cfg.sampler))
        specs = strategy_specs(cfg)
        policies = []
        for spec in specs:
            policy = build_selector(spec, cfg)
            policy.check(sampler_cfg.num_steps)
            policies.append((label(spec), policy))
        prompts, meta = prompt_sets.build(plain(cfg.prompts)).load_with_meta()
        metric_objs = [metrics.build(m) for m in plain(cfg.metrics)]
        logger = loggers.build(plain(cfg.logger))
        model_cfg = plain(cfg.model)
        models.get(model_cfg.get("name", ""))
        if int(cfg.batch_size) < 1:
            raise ConfigError(f"batch_size must be >= 1; got {cfg.batch_size}")
    except (ComponentError, TypeError, ValueError) as err:
        raise ConfigError(str(err)) from err
    return sampler_cfg, policies, prompts, meta, metric_objs, logger, model_cfg


def run(cfg: DictConfig, out: Path) -> list[dict]:
    sampler_cfg, policies, prompts, meta, metric_objs, logger, model_cfg = prepare(cfg)
    jobs = make_jobs(prompts, meta, list(cfg.seeds), cfg.num_prompts, int(cfg.subset_seed))
    context = {"model": model_cfg["name"], "meta": [j.meta for j in jobs]}
    usable = []
    for m in metric_objs:
        reason = m.unavailable(context)
        if reason:
            log.warning("skipped metric — %s", reason)
        else:
            usable.append(m)
    adapter = models.build(model_cfg)
    cache = ReferenceCache(cfg.cache_dir or cache_dir(), model_cfg, plain(cfg.sampler))
    if cfg.diagnostics:
        policies = [(name, RecordingPolicy(p, keep_outputs=(i == 0))) for i, (name, p) in enumerate(policies)]

    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    logger.start(out, OmegaConf.to_container(cfg, resolve=True), name=cfg.experiment, group=cfg.experiment,
                 tags=[model_cfg["name"]])
    results = evaluate_strategies(adapter, policies, jobs, sampler_cfg, int(cfg.batch_size), usable, cache,
                                  bool(cfg.warmup), int(cfg.repeats))

    rows = []
    for r in results:
        row = {"method": r.label, "alpha": float(r.policy.alpha) if r.policy.prunes else 1.0,
               "start_step": int(r.policy.start_step), "steps": sampler_cfg.num_steps, **r.metrics}
        rows.append(row)
        if cfg.save_images:
            d = out / "images" / r.label
            d.mkdir(parents=True, exist_ok=True)
            for job, img in zip(jobs, r.images):
                to_pil(img).save(d / f"{job.index:05d}_seed{job.seed}.png")
        logger.log_images(f"samples/{r.label}", r.images[:16], [j.prompt for j in jobs[:16]])

    notes = [f"Model `{model_cfg['name']}`, {len(jobs)} images ({len(set(j.prompt for j in jobs))} prompts × "
             f"{len(cfg.seeds)} seeds), {sampler_cfg.num_steps} steps, guidance {sampler_cfg.guidance_scale}. "
             "Speed-up: wall clock against the full model in the same process; MACs include the selection's own work."]
    if any(m.name == "clip_score" for m in usable):
        notes.append(f"CLIP score backbone: `{next(m for m in usable if m.name == 'clip_score').backbone}`.")
    report.write_csv(rows, out / "results.csv")
    (out / "results.md").write_text(report.markdown_table(rows, cfg.title, notes))
    report.cost_quality_plot(rows, out / "cost_quality.png", cfg.title)
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    if cfg.diagnostics:
        write_diagnostics(results, out / "diagnostics", jobs)
    logger.log_metrics({f"{r['method']}/{k}": v for r in rows for k, v in r.items() if isinstance(v, (int, float))})
    logger.finish()
    log.info("\n%s", (out / "results.md").read_text())
    return rows


def write_diagnostics(results, folder: Path, jobs) -> None:
    """Selection maps of every strategy, the cluster map of clustered ones, the relative-noise correlation."""
    folder.mkdir(parents=True, exist_ok=True)
    first = results[0].results[0].trace
    grid, steps = first.grid, len(first.steps)
    pruned = {r.label: r.results[0].trace.indices for r in results[1:]}
    if pruned:
        start = next((i + 1 for i, idx in enumerate(next(iter(pruned.values()))) if idx is not None), steps)
        picks = sorted({start, min(start + 1, steps), min(start + 2, steps), steps})
        diagnostics.selection_maps(pruned, grid, folder / "selection_maps.png", picks)
    for r in results[1:]:
        labels = getattr(r.policy, "cluster_labels", None)
        if torch.is_tensor(labels):
            diagnostics.cluster_map(labels[0], grid, folder / f"clusters_{r.label}.png", r.images[0])
    outputs = getattr(results[0].policy, "outputs", {})
    reference = max(1, min(7, steps - 3))
    if len(outputs) >= reference + 3:
        r = diagnostics.noise_correlation(outputs, reference, reference + 1, folder / "relative_noise_correlation.png")
        (folder / "relative_noise_correlation.txt").write_text(f"pearson_r {r:.4f}\n")
    image_grid(results[0].images[:16]).save(folder / "full_samples.png")


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg, Path(HydraConfig.get().runtime.output_dir))
    except ConfigError as err:
        raise SystemExit(f"catlab: config error: {err}") from None


if __name__ == "__main__":
    main()
