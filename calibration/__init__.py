"""Calibration stage (installed as ``quantkit.calibration``): per-layer statistics the quantizer consumes.

Weight statistics come from the checkpoint alone (``weights``); activation statistics, from
a model and inputs, will live beside them.
"""
from .weights import WeightStats, collect_weight_stats, weight_stats

__all__ = ["WeightStats", "collect_weight_stats", "weight_stats"]
