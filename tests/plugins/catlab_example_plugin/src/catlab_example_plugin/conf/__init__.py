"""Hydra config groups shipped by this plugin (found through the ``catlab.conf`` entry point)."""
