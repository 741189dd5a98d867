"""Transformer families, one module each: a family's pruning spec, its attention processors, its MAC formula,
its cache-dit pattern, its model adapters (the checkpoint's and a tiny random-weight one), all in one file that
registers them (``families.register``, ``@models.register``), plus its YAML in ``conf/model/``. Every module here
is imported with catlab, so a new file needs no import line anywhere."""

from catlab.registry import import_submodules

import_submodules(__name__, __path__)
