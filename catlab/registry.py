"""One small registry type; one instance per component kind.

A component is a class (usually a dataclass, whose fields are its config) registered
under a short name::

    from catlab.registry import selectors

    @selectors.register("my_strategy")
    @dataclass
    class MyStrategy(Policy):
        alpha: float = 0.3

    policy = selectors.build({"name": "my_strategy", "alpha": 0.5})

Third-party packages add components through the ``catlab.plugins`` entry-point
group: each entry point names a module that is imported (and so registers its
components) the first time any registry is asked for a name it does not know.
Plugins ship Hydra config files through the ``catlab.conf`` entry-point group
(see ``docs/plugins.md``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import importlib
import importlib.metadata
import inspect
import pkgutil
from collections.abc import Callable, Mapping
from typing import Any

PLUGIN_GROUP = "catlab.plugins"


def _check_not_shadowed() -> None:
    """Fail with one line when ``import catlab`` found a folder that is not this package.

    A directory named ``catlab`` without an ``__init__.py`` in the working directory (or
    anywhere early on ``sys.path``) is imported as a namespace package in place of an
    editable install: catlab's submodules still load, but its components are never
    registered, and every lookup would fail with "registered: (none)".
    """
    import sys
    from pathlib import Path

    package = sys.modules.get("catlab")
    if package is None or getattr(package, "__file__", None) is not None:
        return
    where = ", ".join(str(p) for p in getattr(package, "__path__", [])) or "(unknown)"
    message = (
        f"catlab: `import catlab` found the folder {where}, which is not the catlab package (no __init__.py; "
        f"the package is {Path(__file__).resolve().parent}). Run from another directory, or rename that folder."
    )
    main = getattr(sys.modules.get("__main__"), "__spec__", None)
    if main is not None and str(main.name).startswith("catlab."):  # python -m catlab.<command>: one line, no traceback
        print(message, file=sys.stderr)
        raise SystemExit(1)
    raise ImportError(message)


_check_not_shadowed()
CONF_GROUP = "catlab.conf"

_plugins_loaded = False


class ComponentError(ValueError):
    """A component name or config that cannot be built; the message says what is allowed."""


def import_submodules(package: str, path) -> None:
    """Import every module of a package, so that each registers its components.

    Called from the ``__init__`` of each built-in component package (``catlab.selection``,
    ``catlab.models``, ...): a new file there is registered without editing any import list.
    """
    for info in pkgutil.iter_modules(path):
        importlib.import_module(f"{package}.{info.name}")


def load_plugins() -> list[str]:
    """Import every module named in the ``catlab.plugins`` entry-point group, once."""
    global _plugins_loaded
    if _plugins_loaded:
        return []
    _plugins_loaded = True
    loaded = []
    for ep in importlib.metadata.entry_points(group=PLUGIN_GROUP):
        ep.load()
        loaded.append(ep.name)
    return loaded


class Named:
    """The one ``name`` property of a registered component: the name it was registered under.

    Mixed into every component base (``Policy``, ``StepCache``, ``Reuse``, ``Metric``, ...), so a
    component's name is what its config says (``{"name": "taylorseer"}``); an unregistered
    subclass (a test's, a user's experiment) falls back to its class name.
    """

    @property
    def name(self) -> str:
        return getattr(type(self), "registered_name", type(self).__name__)


class Registry:
    """Names → component classes for one kind (selector, clusterer, model, ...)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """A class decorator that registers a component under ``name``.

        Args:
            name: the name configs and :meth:`build` use (``selector=name``, ``{"name": name}``).

        Returns:
            The decorator; it sets ``registered_name`` on the class and returns the class unchanged.

        Raises:
            ComponentError: another class is registered under ``name`` already.
        """

        def deco(obj: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._entries and self._entries[name] is not obj:
                raise ComponentError(f"{self.kind} '{name}' is registered twice")
            self._entries[name] = obj
            with contextlib.suppress(AttributeError):  # a frozen data object (a FamilySpec) keeps its own name
                obj.registered_name = name
            return obj

        return deco

    def names(self, pattern: str = "*") -> list[str]:
        """The registered names, sorted, plugins included.

        Args:
            pattern: a shell-style pattern the names must match (``"cat*"``); all by default.
        """
        load_plugins()
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))

    def builtin_names(self, pattern: str = "*") -> list[str]:
        """The names registered by catlab itself (modules under ``catlab.``), plugins left out.

        catlab's own tests walk these: a plugin's components answer to their own tests and
        to :func:`catlab.testing.check_policy`, not to catlab's per-component tables.
        """
        return sorted(
            n
            for n, obj in self._entries.items()
            if getattr(obj, "__module__", "").startswith("catlab.") and fnmatch.fnmatch(n, pattern)
        )

    def __contains__(self, name: str) -> bool:
        return name in self.names()

    def get(self, name: str) -> Callable[..., Any]:
        """The component class registered under ``name`` (plugins are loaded when it is not built in).

        Args:
            name: a registered name.

        Raises:
            ComponentError: no component has that name; the message lists those that do.
        """
        if name not in self._entries:
            load_plugins()
        if name not in self._entries:
            known = ", ".join(self.names()) or "(none)"
            raise ComponentError(f"unknown {self.kind} {name!r}; registered: {known}")
        return self._entries[name]

    def build(self, cfg: Mapping[str, Any] | str, **extra: Any) -> Any:
        """Build a component from its config, checking the keys before any compute.

        Args:
            cfg: ``{"name": ..., **params}`` (the component's dataclass fields), or a bare name
                for its defaults, e.g. ``selectors.build({"name": "cat", "alpha": 0.3})``.
            **extra: more keyword arguments for the component (a selector's parts, say).

        Returns:
            The built component.

        Raises:
            ComponentError: no ``name``, an unknown name, or keys the component does not take
                (the message names the key and the allowed ones).
        """
        if isinstance(cfg, str):
            cfg = {"name": cfg}
        params = dict(cfg)
        name = params.pop("name", None)
        if name is None:
            raise ComponentError(f"{self.kind} config has no 'name' key; known: {', '.join(self.names())}")
        cls = self.get(name)
        params.update(extra)
        allowed = config_fields(cls)
        bad = sorted(set(params) - set(allowed))
        if bad:
            raise ComponentError(f"{self.kind} '{name}' has no config key(s) {bad}; allowed: {sorted(allowed)}")
        return cls(**params)


def config_fields(cls: Callable[..., Any]) -> list[str]:
    """The keyword arguments a component accepts: dataclass fields, or its signature."""
    if dataclasses.is_dataclass(cls):
        return [f.name for f in dataclasses.fields(cls) if f.init]
    sig = inspect.signature(cls)
    return [p.name for p in sig.parameters.values() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


def config_defaults(cls: Callable[..., Any]) -> dict[str, Any]:
    """The default of each keyword argument a component accepts that is plain data (numbers, strings, lists,
    mappings): a dataclass field's ``default`` or ``default_factory()``, or the signature's."""
    if dataclasses.is_dataclass(cls):
        found = {}
        for f in dataclasses.fields(cls):
            if f.init and f.default is not dataclasses.MISSING:
                found[f.name] = f.default
            elif f.init and f.default_factory is not dataclasses.MISSING:
                found[f.name] = f.default_factory()
    else:
        params = inspect.signature(cls).parameters.values()
        found = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    return {k: v for k, v in found.items() if _plain(v)}


def _plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain(x) for x in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _plain(x) for k, x in value.items())
    return value is None or isinstance(value, (bool, int, float, str))


scorers = Registry("scorer")
stalenesses = Registry("staleness")
clusterers = Registry("clusterer")
poolings = Registry("pooling")
selectors = Registry("selector")
models = Registry("model")
metrics = Registry("metric")
prompt_sets = Registry("prompts")
loggers = Registry("logger")
reuses = Registry("reuse")
stepcaches = Registry("stepcache")
#: transformer families (:class:`catlab.pruning.families.FamilySpec` data objects, not classes), one module
#: of ``catlab/families/`` each; no config group picks them: :func:`catlab.pruning.families.family_of` finds
#: a transformer's family by its class
families = Registry("family")

#: every registry by the config group that picks its components (conf/<group>/<name>.yaml); metrics
#: have no group: ``catlab.evaluate`` names them in its ``metrics`` list
REGISTRIES = {
    "scorer": scorers,
    "staleness": stalenesses,
    "clusterer": clusterers,
    "pooling": poolings,
    "selector": selectors,
    "model": models,
    "prompts": prompt_sets,
    "logger": loggers,
    "reuse": reuses,
    "stepcache": stepcaches,
    "metric": metrics,
}
