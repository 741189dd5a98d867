"""Adds the config folders that catlab plugins declare to Hydra's search path.

A plugin package names a Python package holding Hydra config files in the
``catlab.conf`` entry-point group; its ``selector/<name>.yaml`` then works as
``python -m catlab.run selector=<name>``.
"""

import importlib.metadata

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class CatlabPluginSearchPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        for ep in importlib.metadata.entry_points(group="catlab.conf"):
            search_path.append(provider=f"catlab-plugin-{ep.name}", path=f"pkg://{ep.value}")
