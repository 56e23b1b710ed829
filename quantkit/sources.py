"""Sources: what convert, plan and validate read, composed from a checkpoint and a naming.

``open_checkpoint`` reads every layout under its own names; ``comfy_names`` presents a diffusers
model under the names ComfyUI loads. This module, above both, is the one place that combines them.
"""
from __future__ import annotations

import os

from .checkpoint import open_checkpoint
from . import comfy_names, comfy_names_image, comfy_names_video
from .comfy_encoder_names import comfyui_encoder_view
from .comfy_names import COMFYUI, comfyui_view
from .errors import OptionsError
from .reader import TensorSource

NAMINGS = (COMFYUI,)
# Every diffusers family written under ComfyUI's names, the first that detects a checkpoint wins.
COMFYUI_VIEWS = (*comfy_names.VIEWS, *comfy_names_video.VIEWS, *comfy_names_image.VIEWS)
# The same, naming the families no file is written for (LTX-2): what ``plan`` detects a family through.
COMFYUI_NAMINGS = tuple((what, names, detect, comfy_names_video.NAMES_ONLY.get(what, build))
                        for what, names, detect, build in COMFYUI_VIEWS)


def open_source(path: str | os.PathLike, *, component: str | None = None, ema: bool | None = False,
                names: str | None = None) -> TensorSource:
    """The checkpoint at ``path``, under the names a format writes.

    Args:
        path: a safetensors file, a sharded checkpoint's index or folder, a model folder (or a
            diffusers pipeline with ``component``), or a PyTorch pickle (``open_checkpoint``).
        component: the pipeline folder to read (``transformer``, ``unet``...).
        ema: read the EMA weights of a checkpoint that holds both (None: decide from the file).
        names: None for the checkpoint's own names, ``"comfyui"`` for the names ComfyUI loads (a
            diffusers FLUX.1 / SD3 transformer, UNet or a family of ``COMFYUI_VIEWS`` renamed, a
            transformers text encoder under ComfyUI's text-encoder names; any other checkpoint as it is).

    Returns:
        A ``TensorSource`` (a context manager): its tensors' headers, read on demand.

    Raises:
        OptionsError: an unknown ``names``.
        QuantkitError: a subclass for a file that is missing, unreadable or hostile, naming it.

    >>> with open_source("model.safetensors") as src:       # doctest: +SKIP
    ...     print(len(src.tensors))
    """
    if names is not None and names not in NAMINGS:
        raise OptionsError(f"unknown naming {names!r}", hint=f"known: {', '.join(NAMINGS)}")
    checkpoint = open_checkpoint(path, component=component, ema=ema)
    if names is None:
        return checkpoint
    try:
        return comfyui_encoder_view(checkpoint) or comfyui_view(checkpoint, COMFYUI_VIEWS)
    except BaseException:
        checkpoint.close()
        raise
