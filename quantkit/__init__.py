"""quantkit: FP8 (E4M3) checkpoints half the size of BF16, provably faithful to the original.

The public API, imported on first use so that ``import quantkit`` stays cheap (no torch):

>>> import quantkit
>>> options = quantkit.ConvertOptions.from_strings(granularity="channel")
>>> result = quantkit.convert("model.safetensors", "model-fp8.safetensors", options)   # doctest: +SKIP
>>> report = quantkit.validate("model-fp8.safetensors", "model.safetensors", min_sqnr=30)  # doctest: +SKIP
>>> report.ok                                                                             # doctest: +SKIP
True

``convert`` streams a checkpoint into an FP8 output (``quantkit.quantize.convert``); ``validate``
checks an output's hashes and fidelity (``quantkit.validation.validate``, what it checks a
``ValidateOptions``); ``open_checkpoint`` reads any checkpoint layout; ``open_source`` does so
under the names a format writes; ``make_plan``
decides every tensor's fate from the header; ``load_dequantized`` reads an output back as its
source's values; ``runtime`` loads an FP8 checkpoint into a model (``quantkit.runtime.load``).
"""
from ._version import __version__

# name -> (module, attribute); None: the module itself
_API = {
    "convert": ("quantize", "convert"),
    "validate": ("validation", "validate"),
    "ValidateOptions": ("options", "ValidateOptions"),
    "ConvertOptions": ("options", "ConvertOptions"),
    "make_plan": ("plan", "make_plan"),
    "open_checkpoint": ("checkpoint", "open_checkpoint"),
    "open_source": ("sources", "open_source"),
    "load_dequantized": ("readback", "load_dequantized"),
    "runtime": ("runtime", None),
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'quantkit' has no attribute {name!r}")
    import importlib
    module_name, attribute = _API[name]
    module = importlib.import_module(f"{__name__}.{module_name}")
    return module if attribute is None else getattr(module, attribute)


def __dir__():
    return sorted(set(globals()) | set(_API))
