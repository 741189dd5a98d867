"""Building components from composed configs, shared by ``catlab.run`` and ``catlab.evaluate``."""

from __future__ import annotations

import logging
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from catlab.assembly import CompositionError, PruningSession, StepReuse
from catlab.pruning.families import UnsupportedModelError
from catlab.registry import ComponentError, models, stepcaches
from catlab.sampler import SamplerConfig
from catlab.selection.base import Policy


class ConfigError(ValueError):
    """A config that cannot work; raised before any compute, naming the bad key or value."""


def plain(node: Any) -> Any:
    """A DictConfig/ListConfig as plain Python containers (resolved); anything else unchanged."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def build_step_cache(spec: Any, sampler_cfg: SamplerConfig):
    """A :mod:`catlab.stepcache` wrapper from a name or mapping (``None``: no cache), for the run's sampler.

    Fails at once on an unknown cache or key, or a ``num_steps`` that is not the
    sampler's. Whether it composes with the selector is the assembly's check
    (:func:`assemble`).
    """
    spec = plain(spec)
    if spec is None:
        return None
    cache = stepcaches.build(spec)
    steps = getattr(cache, "num_steps", None)
    if hasattr(cache, "num_steps") and steps is None:
        cache.num_steps = int(sampler_cfg.num_steps)  # null: the run's
    elif steps is not None and int(steps) != int(sampler_cfg.num_steps):
        raise ConfigError(f"stepcache.num_steps={steps} must equal sampler.num_steps={sampler_cfg.num_steps}")
    return cache


def set_threads(threads: int | None) -> None:
    """Pin torch's CPU thread count when asked (``threads: null`` leaves torch's default)."""
    if threads is not None:
        if int(threads) < 1:
            raise ConfigError(f"threads must be >= 1 or null; got {threads}")
        torch.set_num_threads(int(threads))


def build_model(model_cfg: dict):
    """The model adapter; a checkpoint that cannot load is a config error naming the model."""
    try:
        adapter = models.build(model_cfg)
    except (
        ComponentError,
        TypeError,
        ValueError,
        OSError,
        ArithmeticError,
        RuntimeError,
        AssertionError,
        AttributeError,
    ) as err:  # a size, a device or a dtype the model cannot take, or missing weights
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = ""
        if isinstance(err, OSError) and "path" in model_cfg:
            reason = reason.split(" (")[0]  # diffusers' long explanation points at a stack trace we do not print
            hint = (
                f". Set model.path= to a local folder with the diffusers weights (now {model_cfg['path']!r}; a hub "
                "id works when it is in the Hugging Face cache or can be downloaded); full-size models also want "
                "a GPU (model.device=cuda)"
            )
        raise ConfigError(f"model {model_cfg.get('name')!r} could not be built: {reason}{hint}") from err
    check_size(adapter, model_cfg.get("name"))
    return adapter


def check_size(adapter, name) -> None:
    """Refuse a height or width the model cannot take: both must be positive multiples of the VAE's
    downscaling times the transformer's patch size (else the latent grid does not tile into patches)."""
    multiple = int(adapter.vae_scale) * int(adapter.patch_size)
    h, w = int(adapter.height), int(adapter.width)
    if h < multiple or w < multiple or h % multiple or w % multiple:
        raise ConfigError(
            f"model {name!r} takes sizes that are multiples of {multiple} (VAE scale "
            f"{adapter.vae_scale} x patch {adapter.patch_size}); got model.height={h}, model.width={w}"
        )


#: seeds a torch generator takes: non-negative 63-bit integers (-1 and 2**64 - 1 would give the same noise)
SEED_LIMIT = 2**63


def check_seeds(seeds, key: str) -> None:
    """Refuse a seed outside ``[0, 2^63)``, naming the key."""
    for s in seeds:
        if not 0 <= int(s) < SEED_LIMIT:
            raise ConfigError(f"{key}: seed {s} is outside [0, 2^63) (seeds are non-negative 63-bit integers)")


def sampler_config(node):
    """The :class:`~catlab.sampler.SamplerConfig` of a run, saying once when guidance is off."""
    sampler_cfg = SamplerConfig(**plain(node))
    if float(sampler_cfg.guidance_scale) <= 1.0:
        logging.getLogger("catlab").info(
            "sampler.guidance_scale=%g <= 1: unguided (no classifier-free guidance)", sampler_cfg.guidance_scale
        )
    return sampler_cfg


def check_clusters(policy, num_tokens: int) -> None:
    """Refuse an exact cluster count (``per_tokens=0``) above the image tokens, instead of a quiet clamp."""
    for part in (policy, getattr(policy, "inner", None), getattr(policy, "policy", None)):
        clusterer = getattr(part, "clusterer", None)
        count = getattr(clusterer, "num_clusters", None)
        if count is not None and not getattr(clusterer, "per_tokens", 0) and int(count) > num_tokens:
            raise ConfigError(
                f"clusterer.num_clusters={count} is more than the {num_tokens} image tokens of this "
                f"model and size; at most {num_tokens} (or per_tokens > 0 to scale with the grid)"
            )


def assemble(transformer: nn.Module, policy: Policy, parts: StepReuse, sampler_cfg: SamplerConfig) -> PruningSession:
    """The run's one :class:`~catlab.assembly.PruningSession`, checked before any compute.

    Building it is the one check of the composition (a step cache or reuse rule the
    selector cannot take); putting it on ``transformer`` and taking it off again is the
    check of the model: a model the selector cannot prune (in-step AT-EDM on PixArt, a
    transformer of no known family) or a setting the model cannot take (pruning layers
    beyond its depth). Either ends here as a config error.

    Args:
        transformer: the model adapter's transformer.
        policy: the built selector.
        parts: the reuse rule, K/V rule and step cache of the strategy.
        sampler_cfg: the sampler settings (CUDA graphs, MAC counting, index checks).
    """
    try:
        session = PruningSession(
            transformer,
            policy,
            parts,
            cuda_graphs=sampler_cfg.cuda_graphs,
            count_macs=sampler_cfg.count_macs,
            check_indices=sampler_cfg.check_indices,
        )
        with session:
            pass
    except (CompositionError, UnsupportedModelError, ValueError) as err:  # a step cache's own failure stays one
        raise ConfigError(str(err)) from None
    return session


def check_model_fits(transformer: nn.Module, policy: Policy, parts: StepReuse | None = None) -> None:
    """:func:`assemble` for a loop that builds its own sessions (an evaluation): the same checks, no session kept."""
    assemble(transformer, policy, parts or StepReuse(), SamplerConfig(num_steps=1))


def quiet_libraries() -> None:
    """Keep a run's console and log to catlab's own lines: the libraries' known-harmless notices are errors-only.

    (diffusers' "install accelerate" advice, transformers' torchvision notices, weight-loading
    progress bars, deprecation warnings of arguments catlab does not pass.)
    """
    import warnings

    import diffusers
    import transformers

    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()
    for module in ("diffusers", "transformers", "torch", "huggingface_hub"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)


def run_app(run, cfg) -> None:
    """Run a Hydra app's ``run(cfg, output_dir)``; whatever a user can cause ends in one line, not a traceback.

    A config error, a refused step cache, a model the strategy cannot prune or a folder that cannot be written
    (``catlab: cannot write <path>: <reason>``) ends a single run with that line
    (:class:`~catlab.cli.CatlabExit`, exit status 1) and removes what the run
    made: the whole run directory when Hydra made it for this run, else the new
    entries in it. A sweep job that fails for any reason writes its first error
    line to its log and to ``failed.json`` (the traceback too, for the
    developer) and lets the sweep go on: the sweep's summary
    (:mod:`catlab.sweep`) lists it as failed and the sweep exits non-zero.
    """
    import json
    import logging
    import traceback
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from catlab.cli import CatlabExit, io_message, os_error
    from catlab.planner import IndexContractError
    from catlab.pruning.families import UnsupportedModelError
    from catlab.stepcache import StepCacheError

    quiet_libraries()
    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    hydra_files = {".hydra", f"{hc.job.name}.log"}
    before = {p.name for p in out.iterdir()} if out.exists() else set()
    fresh = before <= hydra_files  # Hydra made this directory for this run
    try:
        check_choices(cfg, hc)
        run(cfg, out)
    except Exception as err:  # noqa: BLE001 (sorted below: an input, a write, or a bug)
        single = hc.mode == RunMode.RUN
        io = os_error(err)
        if isinstance(err, (ConfigError, StepCacheError)):
            kind = "config error" if isinstance(err, ConfigError) else "step cache error"
            message = str(err) if str(err).startswith("catlab:") else f"catlab: {kind}: {err}"
        elif io is not None:
            message = io_message(io)
        elif isinstance(err, IndexContractError):  # a selector (often a plugin) that breaks the contract
            message = f"catlab: {err}"
        elif isinstance(err, UnsupportedModelError):  # a model the chosen strategy cannot prune
            message = f"catlab: unsupported model: {err}"
        elif single:
            raise  # a bug, not an input: its traceback is what the developer needs
        else:
            first = (str(err).strip().splitlines() or [""])[0]
            message = f"catlab: {type(err).__name__}: {first}" if first else f"catlab: {type(err).__name__}"
        if single:
            _close_logs(out)  # the run's log file, before its folder goes
            _remove_created(out, before if not fresh else None)
            raise CatlabExit(message) from None
        # a sweep job: marked failed, and the sweep goes on (its summary lists it; the exit code says so)
        logging.getLogger("catlab").error(message)
        record = {"error": message}
        if not isinstance(err, (ConfigError, StepCacheError)):
            record["traceback"] = "".join(traceback.format_exception(err))
        try:
            (out / "failed.json").write_text(json.dumps(record) + "\n")
        except OSError:
            pass  # the folder cannot be written: the summary calls the job unfinished, the log says why


def _close_logs(out) -> None:
    import logging
    from pathlib import Path

    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and Path(out).resolve() in Path(handler.baseFilename).parents:
            handler.close()
            root.removeHandler(handler)


def check_choices(cfg, hc) -> None:
    """Refuse what Hydra lets through quietly: an option of an optional group (``experiment=nope``) that does
    not exist, and a top-level key the schema does not have (``+foo=1``)."""
    import dataclasses

    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from catlab.cli import key_line, unknown_option

    if GlobalHydra.instance().is_initialized():
        loader = GlobalHydra.instance().config_loader()
        for group, choice in hc.runtime.choices.items():
            if choice is None or group.startswith("hydra") or "/" in group:
                continue
            options = loader.get_group_options(group)
            if options and choice not in options:
                raise ConfigError(unknown_option(group, str(choice), options))
    schema = OmegaConf.get_type(cfg)
    if dataclasses.is_dataclass(schema):
        fields = [f.name for f in dataclasses.fields(schema)]
        for key in cfg.keys():
            if key not in fields:
                raise ConfigError(key_line(str(key), fields, "the config"))


def _remove_created(out, before: set[str] | None) -> None:
    """Remove what a failed run made: ``out`` itself (``before`` None: Hydra made it for this run) and the
    empty folders above it inside the working directory, or else the entries of ``out`` not in ``before``."""
    import shutil
    from pathlib import Path

    if not out.exists():
        return
    if before is not None:
        for p in out.iterdir():
            if p.name not in before:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        return
    shutil.rmtree(out, ignore_errors=True)
    cwd = Path.cwd().resolve()
    for parent in out.resolve().parents:  # the date folder and outputs/, when this run made them
        if parent == cwd or cwd not in parent.parents or any(parent.iterdir()):
            break
        parent.rmdir()
