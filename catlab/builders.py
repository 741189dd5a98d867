"""Building components from composed configs, shared by ``catlab.run`` and ``catlab.evaluate``."""
from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from catlab.registry import ComponentError, models
from catlab.selection.base import Policy


class ConfigError(ValueError):
    """A config that cannot work; raised before any compute, naming the bad key or value."""


def plain(node: Any) -> Any:
    """A DictConfig/ListConfig as plain Python containers (resolved); anything else unchanged."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def build_step_cache(spec: Any, policy: Policy, sampler_cfg):
    """A :mod:`catlab.stepcache` wrapper from a name or mapping (``None``: no cache), checked against the run.

    Fails before compute where the cache cannot work: an unknown cache or key, a
    ``num_steps`` that is not the sampler's, or token pruning inside a cache that
    compares block residuals between steps.
    """
    spec = plain(spec)
    if spec is None:
        return None
    from catlab.assembly import CompositionError, StepReuse, check_composition
    from catlab.stepcache import stepcaches

    cache = stepcaches.build(spec)
    steps = getattr(cache, "num_steps", None)
    if hasattr(cache, "num_steps") and steps is None:
        cache.num_steps = int(sampler_cfg.num_steps)  # null: the run's
    elif steps is not None and int(steps) != int(sampler_cfg.num_steps):
        raise ConfigError(f"stepcache.num_steps={steps} must equal sampler.num_steps={sampler_cfg.num_steps}")
    try:
        check_composition(policy, StepReuse(step_cache=cache))
    except CompositionError as err:
        raise ConfigError(str(err)) from None
    return cache


def set_threads(threads: int | None) -> None:
    """Pin torch's CPU thread count when asked (``threads: null`` leaves torch's default)."""
    if threads is not None:
        import torch

        if int(threads) < 1:
            raise ConfigError(f"threads must be >= 1 or null; got {threads}")
        torch.set_num_threads(int(threads))


def build_model(model_cfg: dict):
    """The model adapter; a checkpoint that cannot load is a config error naming the model."""
    try:
        return models.build(model_cfg)
    except (ComponentError, TypeError, ValueError, OSError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = ""
        if isinstance(err, OSError) and "path" in model_cfg:
            reason = reason.split(" (")[0]  # diffusers' long explanation points at a stack trace we do not print
            hint = (f". Set model.path= to a local folder with the diffusers weights (now {model_cfg['path']!r}; a hub "
                    "id works when it is in the Hugging Face cache or can be downloaded); full-size models also want "
                    "a GPU (model.device=cuda)")
        raise ConfigError(f"model {model_cfg.get('name')!r} could not be built: {reason}{hint}") from err


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
    """Run a Hydra app's ``run(cfg, output_dir)``; a config or step-cache error ends it with one line, not a traceback.

    A single run that produced nothing removes its directory instead of leaving an
    empty one behind. A sweep job writes the error to its log and to ``failed.json``
    and lets the sweep go on: the sweep's summary (:mod:`catlab.sweep`) lists it as
    failed and the sweep exits non-zero.
    """
    import json
    import logging
    import shutil
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from catlab.stepcache import StepCacheError

    quiet_libraries()
    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    try:
        run(cfg, out)
    except (ConfigError, StepCacheError) as err:
        kind = "config error" if isinstance(err, ConfigError) else "step cache error"
        message = f"catlab: {kind}: {err}"
        produced = any(p.name != ".hydra" and p.name != f"{hc.job.name}.log" for p in out.iterdir()) if out.exists() else False
        if hc.mode == RunMode.RUN and not produced:
            logging.shutdown()
            shutil.rmtree(out, ignore_errors=True)
            for parent in (out.parent, out.parent.parent):  # the date folder and outputs/, when this run made them
                if parent.exists() and parent != Path.cwd() and not any(parent.iterdir()):
                    parent.rmdir()
        else:  # a sweep job: marked failed, and the sweep goes on (its summary lists it; the exit code says so)
            logging.getLogger("catlab").error(message)
            (out / "failed.json").write_text(json.dumps({"error": message}) + "\n")
            if hc.mode == RunMode.MULTIRUN:
                return
        raise SystemExit(message) from None
