"""Metrics: cost (MACs, time) now; fidelity and alignment build on the same registry."""
from catlab.metrics.cost import cost_metrics

__all__ = ["cost_metrics"]
