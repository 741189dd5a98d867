"""Transformer families added as one module each: a family's pruning spec, attention processor, MAC
formula and model adapters in one file that registers them (``register_family``, ``@models.register``),
plus its YAML in ``conf/model/``. Every module here is imported with catlab."""

from catlab.registry import import_submodules

import_submodules(__name__, __path__)
