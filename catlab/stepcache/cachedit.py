"""cache-dit's block caches as catlab step caches: ``cachedit_dbcache`` and ``cachedit_dbprune``.

cache-dit (``pip install "catlab[peers]"``) is the acceleration library many DiT
users reach for first; these wrappers put it in catlab's harness, on the same
prompts, sampler, guidance and MAC counter as token pruning and diffusers' caches.
A wrapper builds cache-dit's own config and calls cache-dit's own API::

    cache_dit.enable_cache(BlockAdapter(transformer=t, blocks=t.transformer_blocks, forward_pattern=...),
                           cache_config=DBCacheConfig(...), calibrator_config=...)

with the block layout of the family: each family's spec names the ``ForwardPattern``
of its blocks (``FamilySpec.cache_dit_pattern``: ``Pattern_1`` for blocks that take
``(hidden_states, encoder_hidden_states, ...)`` and return
``(encoder_hidden_states, hidden_states)``, ``Pattern_3`` for blocks that take
``hidden_states`` with the text as a keyword and return ``hidden_states`` only).

cache-dit is imported only when a component is built: catlab imports and runs
without it, and a config that needs it fails before any compute with one line
saying how to install it.

Per generation, :meth:`reset` gives cache-dit a fresh context (its own
``refresh_context``), so no residual, counter or forecast crosses from one batch
to the next. :meth:`remove` releases cache-dit's hooks (``disable_cache``) and
puts back the transformer's own ``forward``: the transformer is the stock model again.

catlab's sampler stacks the CFG rows into one transformer call, so cache-dit sees
one call per step (``enable_separate_cfg=False``) and decides for both rows at once.
These caches compare block residuals between steps, as diffusers' FirstBlockCache
does: token pruning inside them is refused (it does not declare ``COMPOSES_WITH_PRUNING``).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

from catlab.capabilities import Capability
from catlab.pruning.families import UnsupportedModelError, family_of, family_specs
from catlab.stepcache.base import StepCache, StepCacheError, stepcaches

INSTALL = 'pip install "catlab[peers]"'

CALIBRATORS = ("taylorseer", "foca", "dmd")


def _block_lists(transformer: nn.Module) -> list[nn.Module]:
    """The transformer's block lists, in the order its forward runs them (dual-, then single-stream)."""
    return [getattr(transformer, kind.attr) for kind in family_of(transformer).block_lists()]


def cache_dit_module(component: str = "cachedit"):
    """cache-dit, imported now; a :class:`StepCacheError` with the install line when it is missing."""
    try:
        import cache_dit
    except ImportError:
        raise StepCacheError(f"step cache '{component}' needs cache-dit, which is not installed: {INSTALL}") from None
    return cache_dit


def available() -> bool:
    """Whether cache-dit can be imported (without importing it)."""
    import importlib.util

    try:
        return importlib.util.find_spec("cache_dit") is not None
    except ValueError:  # sys.modules["cache_dit"] is None: hidden on purpose
        return False


@contextlib.contextmanager
def _quiet():
    """cache-dit's loggers at errors only while catlab applies or removes it (its notices are per call)."""
    loggers = [logging.getLogger(n) for n in list(logging.root.manager.loggerDict) if n.startswith("cache_dit")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _limit(value: int | None, name: str) -> int:
    """catlab's ``None`` (no limit) as cache-dit's ``-1``."""
    if value is None:
        return -1
    if int(value) < 0:
        raise StepCacheError(f"{name} must be >= 0 or null (no limit); got {value}")
    return int(value)


@dataclass
class _CacheDit(StepCache):
    """Shared by both components: the adapter, the config, the per-generation refresh, the removal."""

    #: cache-dit ``residual_diff_threshold``: relative L1 change of a residual below which it is reused (0: never)
    threshold: float = 0.08
    #: cache-dit ``Fn_compute_blocks``: the first blocks, always computed
    first_blocks: int = 1
    #: cache-dit ``Bn_compute_blocks``: the last blocks, always computed
    last_blocks: int = 0
    #: cache-dit ``max_warmup_steps``: steps ``1..start_step`` run in full (1-based, as a selector's t0)
    start_step: int = 8
    #: cache-dit ``max_cached_steps``: at most this many cached steps per generation (null: no limit)
    max_cached_steps: int | None = None
    #: cache-dit ``max_continuous_cached_steps``: at most this many cached steps in a row (null: no limit)
    max_skip_steps: int | None = None

    capabilities: ClassVar[Capability] = Capability.NONE  # token pruning inside its steps is refused

    def __post_init__(self) -> None:
        cache_dit_module(self.name)  # fail at build time, before compute, when cache-dit is missing
        if float(self.threshold) < 0:
            raise StepCacheError(f"{self.name}: threshold must be >= 0; got {self.threshold}")
        for key in ("first_blocks", "last_blocks", "start_step"):
            if int(getattr(self, key)) < 0:
                raise StepCacheError(f"{self.name}: {key} must be >= 0; got {getattr(self, key)}")
        self._limits = (
            _limit(self.max_cached_steps, "max_cached_steps"),
            _limit(self.max_skip_steps, "max_skip_steps"),
        )

    # -- cache-dit's configs ------------------------------------------------------------------
    def _common(self) -> dict:
        max_cached, max_skip = self._limits
        return dict(
            residual_diff_threshold=float(self.threshold),
            Fn_compute_blocks=int(self.first_blocks),
            Bn_compute_blocks=int(self.last_blocks),
            max_warmup_steps=int(self.start_step),
            max_cached_steps=max_cached,
            max_continuous_cached_steps=max_skip,
            enable_separate_cfg=False,
        )  # catlab stacks the CFG rows into one call per step

    def cache_config(self):
        raise NotImplementedError

    def calibrator_config(self):
        return None

    # -- apply / reset / remove ---------------------------------------------------------------
    def _pattern(self, transformer: nn.Module):
        try:
            family = family_of(transformer)
        except UnsupportedModelError as err:
            raise StepCacheError(f"{self.name}: {err}") from None
        blocks = _block_lists(transformer)[0]  # the first list: where the Fn head and the Bn tail are counted
        if self.first_blocks + self.last_blocks > len(blocks):
            raise StepCacheError(
                f"{self.name}: first_blocks + last_blocks = {self.first_blocks + self.last_blocks} "
                f"exceeds the {len(blocks)} blocks of this {type(transformer).__name__}"
            )
        name = family.cache_dit_pattern
        if name is None:
            known = ", ".join(s.name for s in family_specs() if s.cache_dit_pattern)
            raise StepCacheError(
                f"{self.name}: no cache-dit block pattern is known for {type(transformer).__name__} "
                f"(FamilySpec.cache_dit_pattern); families with one: {known}"
            )
        return name, getattr(cache_dit_module(self.name).ForwardPattern, name)

    def _apply(self, transformer: nn.Module) -> None:
        cache_dit = cache_dit_module(self.name)
        pattern_name, pattern = self._pattern(transformer)
        self._check_supported(pattern_name, pattern)
        self._own_forward = transformer.__dict__.get("forward")  # put back by remove()
        lists = _block_lists(transformer)
        self._block_attrs = [set(blocks.__dict__) for blocks in lists]
        with _quiet():  # FLUX: its dual- and single-stream lists, each with the same call pattern
            blocks, patterns = (lists[0], pattern) if len(lists) == 1 else (lists, [pattern] * len(lists))
            self._adapter = cache_dit.BlockAdapter(transformer=transformer, blocks=blocks, forward_pattern=patterns)
            cache_dit.enable_cache(
                self._adapter, cache_config=self.cache_config(), calibrator_config=self.calibrator_config()
            )

    def _check_supported(self, pattern_name: str, pattern) -> None:
        """Refuse, with a reason, a layout the installed cache-dit cannot run."""

    def reset(self) -> None:
        """A fresh cache-dit context: no residual, step counter or forecast from the last generation."""
        t = getattr(self, "_transformer", None)
        if t is None or getattr(self, "_adapter", None) is None:
            return
        with _quiet():
            cache_dit_module(self.name).refresh_context(
                t, cache_config=self.cache_config(), calibrator_config=self.calibrator_config()
            )

    def remove(self, transformer: nn.Module | None = None) -> None:
        transformer = transformer if transformer is not None else getattr(self, "_transformer", None)
        adapter = getattr(self, "_adapter", None)
        if transformer is None:
            return
        if adapter is not None:
            with _quiet():
                cache_dit_module(self.name).disable_cache(adapter)
            # cache-dit leaves a bound forward in the instance dict: the class's forward is the stock one
            own = getattr(self, "_own_forward", None)
            if own is None:
                transformer.__dict__.pop("forward", None)
            else:
                transformer.__dict__["forward"] = own
            lists = _block_lists(transformer)
            for blocks, before in zip(lists, getattr(self, "_block_attrs", [set(b.__dict__) for b in lists])):
                for key in set(blocks.__dict__) - before:
                    del blocks.__dict__[key]
        self._adapter = None
        self._transformer = None

    @contextlib.contextmanager
    def context(self, step: int, num_steps: int, **info):
        """cache-dit counts the transformer calls itself (one per step here): nothing to set."""
        yield


@stepcaches.register("cachedit_dbcache")
@dataclass
class CacheDitDBCache(_CacheDit):
    """cache-dit's DBCache (Dual Block Cache), optionally with a calibrator (TaylorSeer, FoCa, DMD).

    Each step after ``start_step`` computes the first ``first_blocks`` blocks and
    compares their residual with the last computed step's; when the relative L1
    change is below ``threshold``, the middle blocks are skipped and their cached
    residual added (forecast by the calibrator when one is set), and the last
    ``last_blocks`` blocks run. Fields and the cache-dit option each sets:

    ======================  =================================================
    ``threshold``           ``DBCacheConfig.residual_diff_threshold``
    ``first_blocks``        ``DBCacheConfig.Fn_compute_blocks``
    ``last_blocks``         ``DBCacheConfig.Bn_compute_blocks``
    ``start_step``          ``DBCacheConfig.max_warmup_steps`` (steps 1..start_step in full)
    ``max_cached_steps``    ``DBCacheConfig.max_cached_steps`` (null: -1, no limit)
    ``max_skip_steps``      ``DBCacheConfig.max_continuous_cached_steps`` (null: -1)
    ``calibrator``          null, or ``TaylorSeerCalibratorConfig`` ("taylorseer"),
                            ``FoCaCalibratorConfig`` ("foca"), ``DMDCalibratorConfig`` ("dmd")
    ``taylorseer_order``    ``TaylorSeerCalibratorConfig.taylorseer_order``
    ======================  =================================================

    cache-dit's TaylorSeer takes its first derivative at the 4th computed step: with
    ``start_step`` < 4 and every later step reused, it reuses the residual as is.
    The calibrators forecast the image stream only (SD3's last block returns no text
    stream for cache-dit's encoder calibrator to record).

    Defaults: F1B0 (cache-dit's fastest layout; its own default F8B0 suits 24+ block
    models), its 0.08 threshold, catlab's 8 warm-up steps, no calibrator.
    """

    #: null (reuse the cached residual as is), or "taylorseer", "foca", "dmd": forecast it
    calibrator: str | None = None
    #: order of the TaylorSeer forecast (calibrator: taylorseer)
    taylorseer_order: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.calibrator is not None and self.calibrator not in CALIBRATORS:
            raise StepCacheError(
                f"{self.name}: calibrator must be null or one of {list(CALIBRATORS)}; got {self.calibrator!r}"
            )
        if int(self.taylorseer_order) < 1:
            raise StepCacheError(f"{self.name}: taylorseer_order must be >= 1; got {self.taylorseer_order}")

    def cache_config(self):
        return cache_dit_module(self.name).DBCacheConfig(**self._common())

    def calibrator_config(self):
        cache_dit = cache_dit_module(self.name)
        if self.calibrator is None:
            return None
        # the image stream only: SD3's last block returns no text stream, so cache-dit's encoder
        # calibrator would find nothing recorded (an AssertionError at the first cached step)
        only_image = dict(enable_calibrator=True, enable_encoder_calibrator=False)
        if self.calibrator == "taylorseer":
            return cache_dit.TaylorSeerCalibratorConfig(**only_image, taylorseer_order=int(self.taylorseer_order))
        if self.calibrator == "foca":
            return cache_dit.FoCaCalibratorConfig(**only_image)
        return cache_dit.DMDCalibratorConfig(**only_image)


@stepcaches.register("cachedit_dbprune")
@dataclass
class CacheDitDBPrune(_CacheDit):
    """cache-dit's DBPrune (Dynamic Block Prune): each block whose input changed by less than ``threshold``
    since the last step that computed it is skipped, its cached residual added.

    The first ``first_blocks``, the last ``last_blocks`` and the blocks in
    ``keep_blocks`` always run. Fields and the cache-dit option each sets:

    ========================  ===============================================================
    ``threshold``             ``DBPruneConfig.residual_diff_threshold``
    ``first_blocks``          ``DBPruneConfig.Fn_compute_blocks``
    ``last_blocks``           ``DBPruneConfig.Bn_compute_blocks``
    ``start_step``            ``DBPruneConfig.max_warmup_steps`` (steps 1..start_step in full)
    ``max_cached_steps``      ``DBPruneConfig.max_cached_steps`` (null: -1, no limit)
    ``max_skip_steps``        ``DBPruneConfig.max_continuous_cached_steps`` (null: -1)
    ``dynamic_threshold``     ``DBPruneConfig.enable_dynamic_prune_threshold``
    ``dynamic_relax_ratio``   ``DBPruneConfig.dynamic_prune_threshold_relax_ratio``
    ``keep_blocks``           ``DBPruneConfig.non_prune_block_ids`` (0-based block indices)
    ========================  ===============================================================

    cache-dit 1.5.3's DBPrune fails on ``Pattern_3`` blocks (PixArt): its pruned
    blocks call the output splitter with an argument it does not take. catlab
    refuses that combination at apply time, with the reason, while the installed
    cache-dit has the mismatch.
    """

    dynamic_threshold: bool = False
    dynamic_relax_ratio: float = 1.25
    keep_blocks: list[int] = field(default_factory=list)

    def cache_config(self):
        return cache_dit_module(self.name).DBPruneConfig(
            **self._common(),
            enable_dynamic_prune_threshold=bool(self.dynamic_threshold),
            dynamic_prune_threshold_relax_ratio=float(self.dynamic_relax_ratio),
            non_prune_block_ids=[int(i) for i in self.keep_blocks],
        )

    def _check_supported(self, pattern_name: str, pattern) -> None:
        if pattern_name != "Pattern_3":
            return
        try:
            from cache_dit.caching.cache_blocks.pattern_3_4_5 import PrunedBlocks_Pattern_3_4_5
        except ImportError:  # another layout of cache-dit: let it run
            return
        # the pruned path calls _process_block_outputs(hidden_states, encoder_hidden_states)
        if len(inspect.signature(PrunedBlocks_Pattern_3_4_5._process_block_outputs).parameters) < 3:
            raise StepCacheError(
                f"{self.name} cannot run on single-stream ({pattern_name}) blocks, PixArt's, with the "
                "installed cache-dit: its DBPrune for them fails at the first step; "
                "use cachedit_dbcache there"
            )
