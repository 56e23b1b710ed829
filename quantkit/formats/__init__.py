"""On-disk output formats, one module each, registered by name.

A format turns the plan into the output file's tensors (``layout``) and metadata, and reads
its own files back for validation (``stored``). Adding a format means adding one module that
subclasses ``OutputFormat`` and decorates it with ``@register``.
"""
from __future__ import annotations

from .base import (REGISTRY, Emit, OutputFormat, Role, StoredTensor, detect_format, get_format, layer_name,  # noqa: F401
                   quantkit_metadata, register, stored_with_scales)
from ..dtypes import fp8_of  # noqa: F401  (re-exported)


def _import_all() -> None:
    """Import every format module of this package: each registers its format (adding a format = adding a file)."""
    import importlib
    import pkgutil
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")


_import_all()
