"""catlab: token pruning for text-to-image diffusion transformers.

The pieces a user reaches for first::

    import catlab
    policy = catlab.selectors.build({"name": "random", "alpha": 0.3})
    catlab.enable_pruning(pipe, policy)           # a stock diffusers pipeline, pruned
    result = catlab.sample(adapter, policy, prompts, seeds)   # catlab's own loop
"""

import catlab.families  # noqa: F401,E402  (one module per transformer family: its spec and its adapters)
import catlab.loggers  # noqa: F401,E402
import catlab.metrics  # noqa: F401,E402
import catlab.models  # noqa: F401,E402  (the embedded model's adapter)
import catlab.prompts  # noqa: F401,E402
import catlab.reuse  # noqa: F401,E402  (reuse rules)
import catlab.selection  # noqa: F401,E402  (register the built-in selectors)
import catlab.stepcache  # noqa: F401,E402  (diffusers' step caches)
from catlab.pruning import TokenPruner  # noqa: F401
from catlab.registry import (  # noqa: F401  (every registry lives in catlab.registry)
    REGISTRIES,
    ComponentError,
    Registry,
    clusterers,
    loggers,
    metrics,
    models,
    poolings,
    prompt_sets,
    reuses,
    scorers,
    selectors,
    stalenesses,
    stepcaches,
)
from catlab.sampler import SamplerConfig, sample  # noqa: F401
from catlab.stock_pipelines import disable_pruning, enable_pruning, pruning_macs, reset_pruning  # noqa: F401

__version__ = "0.1.0"
