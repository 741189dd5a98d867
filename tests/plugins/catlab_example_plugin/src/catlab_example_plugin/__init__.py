"""An example catlab plugin: a selection strategy and its Hydra config."""
