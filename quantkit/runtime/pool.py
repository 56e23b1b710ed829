"""One memory budget for several models: ``Pool``.

The ControlNet case (a FLUX transformer and a ControlNet Union beside it), or a transformer with
its text encoder and VAE, on a machine that holds one of them: every model is loaded into the
pool without reading its blocks; a block is read from its file when it runs and stays in memory
after it while the pool has room (``budget.UnitCache``): by default room is made from the blocks of
models idle since this one's previous call, least recently used first, and a model never evicts its
own, so what stays is stable from call to call (``eviction="lru"``: the least recently used block
of any model, which re-reads everything every call when two models that do not fit together run in
turn). A model not used for a call holds nothing but its metadata, its FP8 scales and the few
tensors outside its blocks (tied weights, tensors directly on the model).

    >>> pool = Pool(max_memory="8GB")                                             # doctest: +SKIP
    >>> flux = pool.load(flux_module, "flux1-dev-fp8.safetensors")                # doctest: +SKIP
    >>> control = pool.load(controlnet_module, "controlnet-union-fp8.safetensors")  # doctest: +SKIP
    >>> pool.held_bytes <= pool.max_memory                                        # doctest: +SKIP
    True

The budget is the sum of the models' tensors outside their blocks, the blocks kept, and the largest
model's blocks in flight (the one running and the one read meanwhile) and dequantization work.
"""
from __future__ import annotations

import os

import torch

from .budget import Eviction, UnitCache, budget_bytes, size
from .loader import load
from .weights import Slot


class Pool:
    """Models sharing ``max_memory`` bytes (or "8GB"), run on ``device``; ``eviction``: "stable"
    (default) or "lru" (``budget.Eviction``)."""

    def __init__(self, max_memory: int | str, device: str | torch.device = "cpu", eviction: str | Eviction = "stable"):
        try:
            eviction = Eviction(eviction)
        except ValueError:
            raise ValueError(f"eviction {eviction!r}: use one of {', '.join(e.value for e in Eviction)}") from None
        self.cache = UnitCache(budget_bytes(max_memory), eviction)
        self.device = torch.device(device)      # "cuda" becomes "cuda:N" in load
        self.models: list = []
        # One buffer the models' weights are dequantized into, shared as the pool reserves one model's
        # work at a time (UnitCache.reserve): a model not in use holds none of it.
        self.slot = Slot()

    @property
    def max_memory(self) -> int:
        return self.cache.budget

    @property
    def held_bytes(self) -> int:
        """Bytes the pool's models hold now: tensors outside blocks, kept blocks, blocks in flight."""
        return self.cache.held

    @property
    def peak_bytes(self) -> int:
        """The most ``held_bytes`` has been (dequantization's work, reserved in the budget, excluded)."""
        return self.cache.peak

    @property
    def kept(self) -> list[tuple[int, str]]:
        """(id of the model, unit) of every block kept now, least recently used first."""
        return list(self.cache.entries)

    @property
    def evicted(self) -> list[tuple[int, str]]:
        """(id of the model, unit) of every block evicted so far, in order."""
        return list(self.cache.evicted)

    def load(self, module: torch.nn.Module, path: str | os.PathLike, compute_dtype: torch.dtype | None = None,
             **options) -> torch.nn.Module:
        """``quantkit.runtime.load(module, path, ...)`` into this pool (``options``: ``prefetch``,
        ``matmul``, ``activations``); refused, before any block is read, where the pool cannot run
        it beside the models already in it."""
        model = load(module, path, "pooled", compute_dtype, pool=self, **options)
        self.models.append(model)
        return model

    def remove(self, model: torch.nn.Module) -> None:
        """Take ``model`` out of the pool: its kept blocks and fixed bytes freed, its hooks removed and
        its file closed (``quantkit_runtime.close()``: it can no longer run)."""
        self.models = [m for m in self.models if m is not model]
        model.quantkit_runtime.close()

    def summary(self) -> dict:
        return {"max_memory": self.max_memory, "eviction": self.cache.eviction.value, "held_bytes": self.held_bytes,
                "peak_bytes": self.peak_bytes,
                "models": len(self.models), "kept_blocks": len(self.cache.entries),
                "room_for_blocks": size(max(self.cache.capacity, 0))}
