"""``python -m catlab.evaluate``: the paper's table for any set of strategies.

Examples::

    python -m catlab.evaluate                                   # full vs random on the embedded model
    python -m catlab.evaluate experiment=embedded_table2        # the committed table in docs/
    python -m catlab.evaluate 'strategies=[full,cat,random]' 'alphas=[0.2,0.3,0.5]'

Writes ``results.csv``, ``results.md``, ``cost_quality.png``, diagnostic
figures, sample images and the per-image results store into the Hydra run
directory. Rerunning with the same ``hydra.run.dir`` resumes: finished records
of the same jobs are skipped, records of other settings are left out of the
table (docs/scaling.md, "Resuming"). ``torchrun --nproc_per_node=N -m catlab.evaluate ...`` shards the
prompts over N processes (see docs/scaling.md).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

import catlab  # noqa: F401  (registers the built-in components)
from catlab import cli
from catlab.builders import (
    ConfigError,
    build_model,
    check_clusters,
    check_model_fits,
    check_seeds,
    plain,
    sampler_config,
    set_threads,
)
from catlab.cli import run_app
from catlab.config import check_groups, register_evaluate_schema
from catlab.evaluation import diagnostics, frontier, paired, report
from catlab.evaluation.clock import Clock
from catlab.evaluation.harness import (
    EvaluatedStrategy,
    References,
    evaluate_strategies,
    layout,
    make_jobs,
    record_metrics,
    set_metrics,
)
from catlab.evaluation.merge import manifest, rows_from_store, write_manifest, write_tables
from catlab.evaluation.recorder import RecordingPolicy
from catlab.evaluation.reference import ReferenceCache
from catlab.evaluation.store import ResultStore
from catlab.grid import grid_tokens
from catlab.loggers.evaluation import log_evaluation
from catlab.loggers.grids import captioned_grid
from catlab.loggers.video import frame_strip
from catlab.metrics.cost import MACS_RULE
from catlab.prompts import cache_dir
from catlab.registry import ComponentError, loggers, metrics, models, prompt_sets
from catlab.strategy import resolve_strategy

log = logging.getLogger("catlab.evaluate")
register_evaluate_schema()


def strategy_specs(cfg: DictConfig) -> list[dict]:
    """The strategies to run, as selector configs: the plain full model first, each pruning strategy once per alpha.

    A strategy may carry ``reuse`` (a rule) and ``stepcache`` (a diffusers step
    cache, e.g. ``{name: full, stepcache: {name: taylorseer, cache_interval: 3}}``);
    the first plain ``full`` (no step cache) is the reference and timing baseline.
    """
    specs = []
    for i, s in enumerate(plain(cfg.strategies)):
        if not (isinstance(s, str) or (isinstance(s, dict) and isinstance(s.get("name"), str))):
            raise ConfigError(
                f"strategies[{i}] must be a selector name or a mapping with a 'name' key "
                f"(e.g. {{name: cat, alpha: 0.3}}); got {s!r}"
            )
        spec = {"name": s} if isinstance(s, str) else dict(s)
        if spec["name"] != "full":
            spec = {**plain(cfg.strategy_defaults), **spec}
        specs.append(spec)

    def reference(spec: dict) -> bool:
        return spec["name"] == "full" and not spec.get("stepcache")

    if not any(reference(s) for s in specs):
        specs.insert(0, {"name": "full"})
    specs.sort(key=lambda s: not reference(s))
    if cfg.alphas:
        specs = [specs[0]] + [
            x
            for s in specs[1:]
            for x in ([s] if s["name"] == "full" else [{**s, "alpha": float(a)} for a in cfg.alphas])
        ]
    return specs


def prepare(cfg: DictConfig):
    """Check and build everything cheap, before the model loads."""
    try:
        check_groups(cfg, ("model", "prompts", "logger"))
        check_lists(cfg)
        sampler_cfg = sampler_config(cfg.sampler)
        check_seeds(list(cfg.seeds), "seeds")
        strategies = [resolve_strategy(spec, cfg) for spec in strategy_specs(cfg)]
        built = [strategy.build(sampler_cfg) for strategy in strategies]
        prompts, meta = prompt_sets.build(plain(cfg.prompts)).load_with_meta()
        metric_objs = [metrics.build(m) for m in plain(cfg.metrics)]
        logger = loggers.build(plain(cfg.logger))
        model_cfg = plain(cfg.model)
        models.get(model_cfg.get("name", ""))
        if int(cfg.batch_size) < 1:
            raise ConfigError(f"batch_size must be >= 1; got {cfg.batch_size}")
        if int(cfg.retime_batches) < 0:
            raise ConfigError(f"retime_batches must be >= 0 (0: never time again); got {cfg.retime_batches}")
    except (ComponentError, TypeError, ValueError) as err:
        raise ConfigError(str(err)) from err
    return sampler_cfg, list(zip(strategies, built)), prompts, meta, metric_objs, logger, model_cfg


def check_lists(cfg: DictConfig) -> None:
    """Refuse, before any compute, what would leave a table with nothing in it: no metrics, no strategy beside
    the full model, no seeds or prompts, or a seed given twice (the same images counted twice)."""
    if not list(cfg.metrics):
        raise ConfigError("metrics=[] leaves the table without quality columns; name one or more, e.g. metrics=[psnr]")
    if not [s for s in plain(cfg.strategies) if s != "full" and not (isinstance(s, dict) and s == {"name": "full"})]:
        raise ConfigError(
            f"strategies={plain(cfg.strategies)} compares nothing with the full model (added first by itself); "
            "name at least one other, e.g. strategies=[cat]"
        )
    seeds = list(cfg.seeds)
    if not seeds:
        raise ConfigError("seeds=[] gives no images; give at least one seed, e.g. seeds=[0]")
    twice = sorted({int(s) for s in seeds if seeds.count(s) > 1})
    if twice:
        raise ConfigError(f"seeds={seeds} gives seed(s) {twice} twice (the same images would count twice)")
    if cfg.num_prompts is not None and int(cfg.num_prompts) < 1:
        raise ConfigError(f"num_prompts must be >= 1 or null (every prompt); got {cfg.num_prompts}")


def _distributed() -> tuple[int, int]:
    """(rank, world size); joins the torchrun process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def _shared_dir(out: Path, world: int) -> Path:
    """Every rank writes into rank 0's run directory."""
    if world == 1:
        return out
    box = [str(out)]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0])


def run(cfg: DictConfig, out: Path) -> list[dict]:
    sampler_cfg, resolved, prompts, meta, metric_objs, logger, model_cfg = prepare(cfg)
    for folder in (out, Path(cfg.store_dir) if cfg.store_dir else out / "store", Path(cfg.cache_dir or cache_dir())):
        cli.check_writable(folder)  # read-only or full: one line now, not after the first batch
    set_threads(cfg.threads)
    rank, world = _distributed()
    out = _shared_dir(out, world)
    jobs = make_jobs(prompts, meta, list(cfg.seeds), cfg.num_prompts, int(cfg.subset_seed))
    my_jobs = jobs[rank::world]
    if world > 1 and str(model_cfg.get("device", "cpu")).startswith("cuda"):
        model_cfg = {**model_cfg, "device": f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"}
    adapter = build_model(model_cfg)  # refuses a size the model cannot take
    # what a metric may need to know to say it cannot run here (a video metric on an image model, ...)
    context = {"model": model_cfg["name"], "meta": [j.meta for j in jobs], "video": len(adapter.grid) == 3}
    usable = []
    for m in metric_objs:
        reason = m.unavailable(context)
        if reason:
            log.warning("skipped metric — %s", reason)
        else:
            usable.append(m)
    for _, (policy, parts) in resolved:
        check_clusters(policy, grid_tokens(adapter.grid))
        check_model_fits(adapter.transformer, policy, parts)
    store = ResultStore(Path(cfg.store_dir) if cfg.store_dir else out / "store")
    weights = adapter.fingerprint()  # a retrained checkpoint must not meet the old one's references or records
    model_key = {**plain(cfg.model), **({"weights": weights} if weights else {})}
    if adapter.timesteps:  # a spacing other than the scheduler's own: old references and records must miss
        model_key["timesteps"] = adapter.timesteps
    references = References(
        ReferenceCache(cfg.cache_dir or cache_dir(), model_key, plain(cfg.sampler)),
        adapter,
        resolved[0][1][0],
        sampler_cfg,
    )
    # what decides a record besides its strategy, prompt, seed and batch: it keys the store and is in every record
    setup = {
        "model": model_key,
        "sampler": {"num_steps": sampler_cfg.num_steps, "guidance_scale": sampler_cfg.guidance_scale},
        "macs_rule": MACS_RULE,
    }
    strategies, infos = [], []
    for order, ((strategy, (policy, parts)), spec) in enumerate(zip(resolved, strategy_specs(cfg))):
        key = strategy.key(
            {
                "model": model_key,
                "sampler": [sampler_cfg.num_steps, sampler_cfg.guidance_scale],
                "macs_rule": MACS_RULE,
            }
        )
        if cfg.diagnostics:
            policy = RecordingPolicy(policy, keep_outputs=not policy.prunes)
        strategies.append(EvaluatedStrategy(strategy.label, policy, key, spec, parts))
        infos.append(
            {
                "key": key,
                "label": strategy.label,
                "order": order,
                "spec": spec,
                "alpha": float(policy.alpha) if policy.prunes else 1.0,
                "start_step": int(policy.start_step),
                "steps": sampler_cfg.num_steps,
                "model": plain(cfg.model),
                "metrics": record_metrics(strategies[-1], usable),
            }
        )
        store.register_strategy(key, infos[-1])
    model_label = (
        model_cfg["name"]
        + (f" ({model_cfg['path']})" if model_cfg.get("path") else "")
        + (" (random weights)" if getattr(adapter, "random_weights", False) else "")
    )
    notes = [
        f"Model `{model_label}`, {len(jobs)} images ({len({j.prompt_id for j in jobs})} prompts × "
        f"{len(cfg.seeds)} seeds), {sampler_cfg.num_steps} steps, guidance {sampler_cfg.guidance_scale}. "
        "Speed-up: wall clock against the full model timed in the same process on the same batches "
        "(strategies take turns on each batch), "
        + (
            "after a warm-up batch; "
            if cfg.warmup
            else "without a warm-up batch (warmup=false: one-time costs fall in the first batch's time); "
        )
        + "MACs include the selection's own work."
    ]
    title = report.settings_title(
        cfg.title,
        len({j.prompt_id for j in jobs}),
        len({j.seed for j in jobs}),
        sampler_cfg.num_steps,
        sampler_cfg.guidance_scale,
    )
    plan = manifest(infos, layout(jobs, int(cfg.batch_size), world), store.root, out, notes)
    plan["title"] = title  # a table rebuilt by catlab.evaluation.merge keeps it
    if rank == 0:
        (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        write_manifest(out, plan)
        logger.start(
            out,
            {**OmegaConf.to_container(cfg, resolve=True), "title": title},  # the title of what actually ran
            name=cfg.experiment_name,
            group=cfg.experiment_name,
            tags=[model_cfg["name"]],
        )

    try:  # the logger ends whatever happens: a failed evaluation leaves no open W&B run writing into its folder
        log.info(
            "evaluating %s on %d images (rank %d of %d)",
            ", ".join(s.label for s in strategies),
            len(my_jobs),
            rank,
            world,
        )
        clock = Clock(torch.get_num_threads(), cpu=str(model_cfg.get("device", "cpu")).startswith("cpu")).start()
        warm = evaluate_strategies(
            adapter,
            strategies,
            my_jobs,
            sampler_cfg,
            int(cfg.batch_size),
            usable,
            store,
            references,
            bool(cfg.warmup),
            int(cfg.repeats),
            out / "images" if cfg.save_images else None,
            int(cfg.retime_batches),
            setup,
        )
        if clock.stop().note():  # the load and CPU time over the timed work said the wall clock is not to be trusted
            log.warning("%s", clock.note())
            notes.append(clock.note())
        if world > 1:
            dist.barrier()
        if rank != 0:
            return []

        rows, store_notes = rows_from_store(store, plan)
        for note in store_notes:
            log.info("%s", note)
        set_metrics(rows, usable, out / "images" if cfg.save_images else None)
        if any(m.name == "clip_score" for m in usable):
            notes.append(f"CLIP score backbone: `{next(m for m in usable if m.name == 'clip_score').backbone}`.")
        per_image = paired.per_image_values(store, plan)  # for paired intervals: is a margin more than noise?
        write_tables(rows, out, title, [*notes, *store_notes], per_image)
        if cfg.frontier:  # each family's Pareto front and the best strategy per budget (catlab/evaluation/frontier.py)
            specs = {i["key"]: i["spec"] for i in infos}
            frontier.write(rows, specs, out, f"{title}, model `{model_label}`", per_image)
        if cfg.diagnostics and all(w is not None for w in warm.values()):
            write_diagnostics(strategies, warm, out / "diagnostics", [j.prompt for j in my_jobs])
        captions = [j.prompt + (f" (seed {j.seed})" if len(cfg.seeds) > 1 else "") for j in my_jobs]
        log_evaluation(logger, rows, out, warm, out / "images" if cfg.save_images else None, captions)
        logger.log_metrics(
            {f"{r['method']}/{k}": v for r in rows for k, v in r.items() if isinstance(v, (int, float))}
        )
    except BaseException:
        logger.finish(failed=True)
        raise
    logger.finish()
    log.info("\n%s", (out / "results.md").read_text())
    return rows


def write_diagnostics(strategies, warm, folder: Path, prompts: list[str] | None = None) -> None:
    """From the warm-up batch: selection maps, cluster maps, the relative-noise correlation, the full model's
    samples (captioned with ``prompts``, the batch's prompts in order, when given)."""
    folder.mkdir(parents=True, exist_ok=True)
    first = warm[strategies[0].label]
    grid, steps = first.trace.grid, len(first.trace.steps)
    # strategies that chose tokens between steps (an in-step pruner such as atedm chooses none)
    pruned = {
        s.label: warm[s.label].trace.indices
        for s in strategies
        if s.policy.prunes and any(i is not None for i in warm[s.label].trace.indices)
    }
    if pruned:
        start = next((i + 1 for i, idx in enumerate(next(iter(pruned.values()))) if idx is not None), steps)
        picks = sorted({start, min(start + 1, steps), min(start + 2, steps), steps})
        diagnostics.selection_maps(pruned, grid, folder / "selection_maps.png", picks)
    for s in strategies:
        labels = getattr(s.policy, "labels", None)  # the token clusters of a clustered selector, (B, N)
        if torch.is_tensor(labels):
            diagnostics.cluster_map(labels[0], grid, folder / f"clusters_{s.folder}.png", warm[s.label].images[0])
    outputs = getattr(strategies[0].policy, "outputs", {})
    reference = max(1, min(7, steps - 3))
    if len(outputs) >= reference + 3:
        r = diagnostics.noise_correlation(outputs, reference, reference + 1, folder / "relative_noise_correlation.png")
        (folder / "relative_noise_correlation.txt").write_text(f"pearson_r {r:.4f}\n")
    shown = first.images[:16]
    if shown.ndim == 5:  # videos: each as its frames side by side
        shown = torch.stack([frame_strip(v) for v in shown])
    captioned_grid(shown, list(prompts or [])[: len(shown)]).save(folder / "full_samples.png")


@hydra.main(version_base="1.3", config_path=str(cli.CONF), config_name="evaluate")  # absolute: imported or run
def app(cfg: DictConfig) -> None:
    run_app(run, cfg, resumable=True)  # Ctrl-C keeps the store: a rerun into the same folder resumes


def main(argv: list[str] | None = None) -> None:
    """The command line (``argv``: its arguments, default ``sys.argv[1:]``); any error is one ``catlab:`` line."""
    cli.main(app, argv, config_name="evaluate")


if __name__ == "__main__":
    main()
