"""Calibration stage (installed as ``quantkit.calibration``): per-layer statistics the quantizer consumes.

Weight statistics come from the checkpoint alone (``weights``, ``observers``); the stats file
(``stats``) holds what ``quantkit calibrate`` measured. Activation statistics need a model and
inputs, so they sit at a higher stage (above the runtime and model output) and are not imported
here: ``inputs`` (calibration inputs), ``activations`` (hooks on the streamed model) and
``collect`` (``calibrate``: weights and activations into a stats file).
"""
from .weights import WeightStats, collect_weight_stats, weight_stats

__all__ = ["WeightStats", "collect_weight_stats", "weight_stats"]
