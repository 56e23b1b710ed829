"""Streamed mode: each block's weights are read from disk when the block runs, and dropped after.

A *unit* is a module whose tensors are read together (``stream_units``): every item of a
``ModuleList`` (FLUX ``transformer_blocks.N`` / ``single_transformer_blocks.N``, SD3
``transformer_blocks.N``, BERT ``encoder.layer.N``, Llama ``model.layers.N``, UNet
``down_blocks.N`` / ``up_blocks.N`` / ``mid_block.resnets.N``...) and every other child that
holds no ``ModuleList`` (embedders, final norms and projections). The rule is generic: the
block lists of every architecture quantkit knows are ``ModuleList``s, and a model without one
streams per top-level child. Tensors directly on a module that holds a ``ModuleList``, and
tensors shared by two units (tied weights), stay resident.

Between calls a unit's tensors are meta tensors of the right shape and dtype: ``model.dtype``
and shapes stay readable, and code that touched a weight outside its block's ``forward`` would
fail loudly instead of computing with stale values. A forward pre-hook reads the unit's FP8
codes and kept tensors (scales are tiny and stay resident), and starts reading the unit that ran
after it last time (registration order until a pass has been seen) on a background thread, so
disk reads overlap compute (``os.preadv`` releases the GIL). A forward hook (``always_call``)
drops them again. At most two units are materialised at once: the one running and the next.

glibc keeps freed blocks of a few MiB in the heap rather than returning them (its mmap threshold
grows after each large free), so without help a process's RSS creeps up by several blocks'
worth; after dropping a unit the hook calls ``malloc_trim(0)`` where libc has it. Measured on a
293 MB FP8 FLUX-like model (4 + 8 blocks, hidden 1024), 5 passes, prefetch off, bf16: RSS after
each pass 712 -> 834 MB without, flat at 458 MB with (426 MB before loading).
"""
from __future__ import annotations

import ctypes
import ctypes.util
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .placements import Placement


def stream_units(module: torch.nn.Module) -> list[str]:
    """The dotted names of the modules streamed as one unit each, in registration order (modules
    without parameters or buffers are no unit).

    >>> class Net(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.embed, self.act = torch.nn.Embedding(10, 4), torch.nn.GELU()
    ...         self.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)])
    ...         self.head = torch.nn.Linear(4, 2)
    >>> stream_units(Net())
    ['embed', 'blocks.0', 'blocks.1', 'head']
    """
    units: list[str] = []

    def walk(prefix: str, m: torch.nn.Module) -> None:
        for name, child in m.named_children():
            full = prefix + name
            if isinstance(child, torch.nn.ModuleList):
                units.extend(f"{full}.{i}" for i, item in child.named_children() if _holds_tensors(item))
            elif _holds_module_list(child):
                walk(full + ".", child)
            elif _holds_tensors(child):
                units.append(full)

    walk("", module)
    return units


def _holds_tensors(m: torch.nn.Module) -> bool:
    return any(True for _ in m.parameters()) or any(True for _ in m.buffers())


def _holds_module_list(m: torch.nn.Module) -> bool:
    return any(isinstance(c, torch.nn.ModuleList) for c in m.modules())


class Transfer:
    """How a unit's tensors, read into host memory, reach the device the model runs on.

    On the CPU they are already there. On CUDA the copy runs on a side stream (on the reading
    thread, so the next unit's copy overlaps this unit's compute); an event recorded after it is
    waited for by the compute stream before the unit runs, and each tensor is marked as used by
    the compute stream (``record_stream``) so the allocator does not hand its memory to the next
    copy while a kernel still reads it. Any other device gets a plain ``.to(device)``."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def move(self, values: dict) -> tuple[dict, object]:
        """(the tensors on the device, the event that says the copy is done or None)."""
        if self.device.type == "cpu":
            return values, None
        if self.stream is None:
            return {k: v.to(self.device) for k, v in values.items()}, None
        with torch.cuda.stream(self.stream):
            moved = {k: v.to(self.device, non_blocking=True) for k, v in values.items()}
            event = torch.cuda.Event()
            event.record(self.stream)
        event.synchronize()        # this (reading) thread only: the host copies may be freed after
        return moved, event

    def arrive(self, values: dict, event) -> dict:
        """``values`` ready for the compute stream."""
        if event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(event)
            for v in values.values():
                v.record_stream(compute)
        return values


def pin_skipped(device: torch.device) -> str | None:
    """Why streamed units are not kept in pinned host memory for a model on ``device``, or None where
    they can be (a CUDA device: page-locked host memory makes the copy to it a true background DMA)."""
    if device.type == "cpu":
        return ("the model runs on the CPU: its streamed blocks are in host memory as they are read, and pinning "
                "only speeds copies to a device")
    if device.type != "cuda":
        return f"pinned memory speeds copies to a CUDA device, not to {device.type}"
    if not torch.cuda.is_available():
        return f"this torch ({torch.__version__}) has no CUDA runtime to pin host memory with"
    return None


class Streamer:
    """Reads each unit's tensors before it runs and drops them after (the hooks of streamed mode).

    With a ``cache`` (a ``Pool``'s ``UnitCache``) a unit that ran is kept while the pool has room,
    under the key (``owner``, unit), and dropped when the cache evicts it."""

    def __init__(self, module: torch.nn.Module, units: dict[str, list[Placement]], read, assign, held_bytes,
                 prefetch: bool, info, transfer: Transfer | None = None, cache=None, owner=None):
        self.units = units                 # unit name -> its placements (targets relative to the root)
        self.order = list(units)
        self.read_one = read               # read(placement) -> the tensor to hold, from disk
        self.assign = assign               # assign(target, value): put a value (or a meta placeholder) in place
        self.info = info                   # RuntimeInfo: materialised / peak bytes are counted there
        self.transfer = transfer or Transfer(torch.device("cpu"))
        self.cache, self.owner = cache, owner
        self.bytes = {u: sum(held_bytes(p) for p in ps) for u, ps in units.items()}
        self.pinned: dict[str, dict] = {}  # unit -> its tensors in pinned host memory (``pin``), read once
        self.next_of: dict[str, str] = {}
        self.last: str | None = None
        self.pending: tuple[str, Future] | None = None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="quantkit-prefetch") if prefetch else None
        self.handles = []
        if cache is not None:            # the pool's eviction knows when each model's calls begin
            self.handles.append(module.register_forward_pre_hook(lambda m, args: cache.begin(owner)))
        for name in self.order:
            sub = module.get_submodule(name)
            self.handles.append(sub.register_forward_pre_hook(self._pre(name)))
            self.handles.append(sub.register_forward_hook(self._post(name), always_call=True))
            self.release(name)

    def read(self, unit: str) -> tuple[dict, object]:
        """The unit's tensors, read from disk (or taken from pinned host memory), made ready to hold
        (``read_one``) and moved to the device."""
        pinned = self.pinned.get(unit)
        if pinned is not None:
            return self.transfer.move(dict(pinned))
        return self.transfer.move({p.target: self.read_one(p) for p in self.units[unit]})

    def pin(self, host_bytes: int) -> list[str]:
        """Read streamed units, in the model's order, into pinned host memory while they fit in
        ``host_bytes``; they are copied to the device from there, no longer read from the file."""
        used = 0
        for unit in self.order:
            if used + self.bytes[unit] > host_bytes:
                continue
            self.pinned[unit] = {p.target: self.read_one(p).pin_memory() for p in self.units[unit]}
            used += self.bytes[unit]
        return [u for u in self.order if u in self.pinned]

    def _pre(self, unit: str):
        def hook(module, args):
            kept = self.cache is not None and self.cache.touch((self.owner, unit))
            if not kept:
                values = self.transfer.arrive(*self._take(unit))
                for target, value in values.items():
                    self.assign(target, value)
                self._count(unit, +1)
            if self.last is not None and self.last != unit:
                self.next_of[self.last] = unit
            self.last = unit
            self._prefetch(self.next_of.get(unit) or self._after(unit))
        return hook

    def _post(self, unit: str):
        def hook(module, args, output):
            if self.cache is not None and self.cache.admit((self.owner, unit), self.bytes[unit],
                                                           lambda: self._evicted(unit)):
                self.info.materialised_bytes -= self.bytes[unit]
                return
            self.release(unit)
            self._count(unit, -1)
            return_freed_memory()
        return hook

    def release(self, unit: str) -> None:
        for p in self.units[unit]:
            self.assign(p.target, None)

    def _evicted(self, unit: str) -> None:
        """The pool dropped a kept unit: its tensors become meta placeholders again."""
        try:
            self.release(unit)
        except ReferenceError:       # the model itself was freed: nothing left to drop
            return
        return_freed_memory()        # as after a streamed unit: else the heap keeps evicted blocks' pages

    def _take(self, unit: str) -> tuple[dict, object]:
        if self.pending is not None:
            name, future = self.pending
            self.pending = None
            if name == unit:
                self._count(name, -1)        # counted while in flight; counted again as materialised
                return future.result()
            future.cancel()
            self._discard(name, future)
        return self.read(unit)

    def _prefetch(self, unit: str | None) -> None:
        if self.pool is None or unit is None:
            return
        if self.cache is not None and (self.owner, unit) in self.cache.entries:
            return
        self.pending = (unit, self.pool.submit(self.read, unit))
        self._count(unit, +1)

    def _discard(self, name: str, future: Future) -> None:
        if not future.cancelled():
            future.result()                  # surface a read error, then drop the tensors
        self._count(name, -1)

    def _after(self, unit: str) -> str | None:
        i = self.order.index(unit) + 1
        return self.order[i] if i < len(self.order) else None

    def _count(self, unit: str, sign: int) -> None:
        info = self.info
        info.materialised_bytes += sign * self.bytes[unit]
        info.peak_bytes = max(info.peak_bytes, info.materialised_bytes + info.resident_bytes)
        if self.cache is not None:
            self.cache.count(sign * self.bytes[unit])

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        if self.pending is not None:
            self.pending[1].cancel()
            self.pending = None
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        if self.cache is not None:
            self.cache.drop_owner(self.owner)


def _malloc_trim():
    """libc's ``malloc_trim`` (glibc), or None where there is none."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c")), "malloc_trim", None)
    except OSError:
        return None


_TRIM = _malloc_trim()


def return_freed_memory() -> None:
    """Give the heap's freed blocks back to the system (glibc's ``malloc_trim``; nothing elsewhere)."""
    if _TRIM is not None:
        _TRIM(0)
