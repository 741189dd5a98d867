"""A strategy: a selector with the parts it takes, a reuse rule, a K/V rule and a step cache — resolved once.

``python -m catlab.run`` runs one strategy, ``python -m catlab.evaluate`` a list of
them. Both resolve each strategy here, so that what is built, what is hashed (the
key that names a run's or a record's identity) and what a table calls it all come
from the same resolved spec::

    strategy = resolve_strategy({"name": "cat", "alpha": 0.5, "reuse": "taylor"}, cfg)
    policy, parts = strategy.build(sampler_cfg)      # parts: the StepReuse (rule, kv, step_cache)
    strategy.key({"model": ..., "sampler": ...}), strategy.label
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from catlab.assembly import StepReuse
from catlab.builders import ConfigError, build_step_cache, plain
from catlab.hashing import config_hash
from catlab.registry import config_defaults, config_fields, reuses, selectors
from catlab.selection.base import Policy

#: component kinds a selector may take as parts: the top-level group reaches the selector when its
#: dataclass has a field of that name, its class lists the kind in ``group_parts`` (all, unless it
#: says otherwise) and its own spec does not set it
SELECTOR_PARTS = ("scorer", "staleness", "clusterer", "pooling")


@dataclass(frozen=True)
class Strategy:
    """``selector`` (with ``name``), the top-level ``parts`` it takes, ``reuse`` (``None``: the
    engine's stale copies, also for ``copy``), ``kv`` (a reuse rule for the unselected tokens' keys
    and values inside attention; ``None``: their stale cached K/V), ``stepcache`` (``None``: none)
    and its table ``label``."""

    selector: dict
    parts: dict
    reuse: Any = None
    stepcache: Any = None
    label: str = ""
    kv: Any = None

    def key(self, context: dict) -> str:
        """The hash of everything that decides this strategy's images, plus ``context`` (model, sampler, ...)."""
        # absent when unset: keys from before step caches and K/V rules hold
        extra = {k: v for k, v in (("stepcache", self.stepcache), ("kv", self.kv)) if v}
        return config_hash({"selector": self.selector, "parts": self.parts, "reuse": self.reuse, **extra, **context})

    def build(self, sampler_cfg) -> tuple[Policy, StepReuse]:
        """``(policy, StepReuse(rule, kv, step_cache))``, each part checked against the sampler settings.

        Whether the parts run together is checked once, where the run is assembled
        (:func:`catlab.builders.assemble`, :class:`~catlab.assembly.PruningSession`).
        """
        policy = selectors.build(self.selector, **self.parts)
        policy.check(sampler_cfg.num_steps)
        parts = StepReuse(
            rule=reuses.build(self.reuse) if self.reuse else None,
            kv=reuses.build(self.kv) if self.kv else None,
            step_cache=build_step_cache(self.stepcache, sampler_cfg),
        )
        return policy, parts


def resolve_strategy(spec: Any, groups: Any) -> Strategy:
    """Resolve a strategy spec (a selector name or mapping, optionally with ``reuse``, ``kv`` and
    ``stepcache`` keys) against the top-level config ``groups`` (scorer, clusterer, ..., reuse, kv, stepcache).

    Keys the spec sets itself win over the top-level groups. The label (:func:`label`) shows what tells the
    strategy apart from the others of its run.
    """
    spec = {"name": spec} if isinstance(spec, str) else dict(plain(spec) or {})
    if "name" not in spec:
        raise ConfigError(f"a selector needs a 'name'; registered selectors: {', '.join(selectors.names())}")
    reuse = plain(spec.pop("reuse", groups.get("reuse")))
    stepcache = plain(spec.pop("stepcache", groups.get("stepcache")))
    kv = plain(spec.pop("kv", groups.get("kv")))
    cls = selectors.get(spec["name"])
    fields, takes = config_fields(cls), getattr(cls, "group_parts", SELECTOR_PARTS)
    parts = {
        kind: plain(groups[kind])
        for kind in SELECTOR_PARTS
        if kind in fields and kind in takes and kind not in spec and groups.get(kind) is not None
    }
    common = plain(groups.get("strategy_defaults")) or {}  # an evaluation's settings of every strategy alike
    if reuse in ("copy", {"name": "copy"}):
        reuse = None  # copying is what the engine does anyway: the same images with or without it
    if kv in ("copy", {"name": "copy"}):
        kv = None  # likewise for the cached K/V
    return Strategy(
        selector=spec,
        parts=parts,
        reuse=reuse,
        stepcache=stepcache or None,
        label=label(spec, {**config_defaults(cls), **common}, reuse=reuse, kv=kv or None, stepcache=stepcache or None),
        kv=kv or None,
    )


def label(selector: dict, defaults: dict | None = None, **parts: Any) -> str:
    """A strategy's table label: the selector's name, then each of its settings that differs from ``defaults``
    (the selector's own, under an evaluation's ``strategy_defaults``) and each of ``parts`` (reuse, kv, stepcache)
    that is set, as ``name[k=v,...]`` (mappings as
    ``name(k=v)``, lists as ``a/b``).

    Everything that tells two strategies of one run apart is in it (α too, where it is not the default), so two
    different strategies never share a label; the selector parts a run gives every strategy alike (its top-level
    ``clusterer=``, ...) are left out. A label is for tables and legends: :func:`~catlab.hashing.folder_name` makes a
    name for files from it.
    """
    defaults = defaults or {}
    extras = [
        f"{k}={_show(v)}" for k, v in selector.items() if k != "name" and not (k in defaults and _same(v, defaults[k]))
    ]
    extras += [f"{k}={_show(v)}" for k, v in parts.items() if v]
    return selector["name"] + (f"[{','.join(extras)}]" if extras else "")


def _same(value: Any, default: Any) -> bool:
    """Whether a setting equals its default (lists and tuples alike)."""
    if isinstance(value, (list, tuple)) and isinstance(default, (list, tuple)):
        return list(value) == list(default)
    try:
        return type(value) is not bool and type(default) is not bool and value == default or value is default
    except Exception:  # noqa: BLE001 (a default that cannot be compared: the setting is shown)
        return False


def _show(value) -> str:
    if isinstance(value, dict):
        inner = ",".join(f"{k}={_show(x)}" for k, x in value.items() if k != "name")
        return f"{value.get('name', '')}({inner})" if inner else str(value.get("name", ""))
    if isinstance(value, (list, tuple)):
        return "/".join(_show(x) for x in value)
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)  # short where exact: 0.3, 1e-05; else every digit
    return str(value)
