"""``load``: put a checkpoint's tensors into a module the user built, FP8 weights kept as FP8."""
from __future__ import annotations

import enum
import os
import weakref
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..errors import ModelMismatchError
from ..fp8 import ROWS_WORK, Granularity, narrow_route
from .placements import Implied, Layout, Placement, TensorSource, open_layout, read_data, read_input_scale, read_scale
from .budget import Plan, budget_bytes, plan, ranges, size
from .streaming import Streamer, Transfer, pin_skipped, stream_units
from .weights import (CHUNK_ELEMENTS, KERNELS, MATMULS, Activations, InputQuant, KernelLog, check_compute_dtype,
                      converted_dtype, held_buffer, make_cast, make_quantized, moved_device)

EXAMPLES = 3


class Mode(enum.Enum):
    RESIDENT = "resident"   # every tensor in memory (FP8 codes as stored)
    STREAMED = "streamed"   # each unit's tensors read from disk when it runs, dropped after
    BUDGET = "budget"       # the units that fit max_memory resident, the rest streamed (budget.plan)
    POOLED = "pooled"       # loaded into a Pool: units kept after they run while the pool has room (LRU)


@dataclass
class RuntimeInfo:
    """What ``load`` did, attached to the module as ``module.quantkit_runtime``.

    ``resident_bytes``: tensors held between calls (the module's non-meta parameters and buffers);
    ``materialised_bytes`` / ``peak_bytes``: streamed units' tensors in memory now / at most, plus
    the resident ones for the peak; ``kernels``: how many weights each kernel path made so far;
    ``activations``: the ``load`` option, and ``inputs``: how many FP8 Linear layers quantize their
    input by each scheme ("static", "unit", "dynamic"; "none": weight-only);
    ``stored_names``: module tensor -> the checkpoint's name of the tensor it was read from whole
    (parts of joined tensors left out), to name what hooks on the module observe;
    ``device``: where the module runs (held tensors live there; streamed units are read into host
    memory and copied there block by block); ``plan``: budget mode's choice (``budget.Plan``), and
    ``residency``: which units stay in memory and why, in one line; ``pinned``: which streamed units
    are kept in pinned host memory (``load(..., host_memory=)``), or why none are, in one line."""

    path: str
    mode: Mode
    format: str                       # the name of the format that wrote it (quantkit.formats), or "plain"
    renamed: str | None               # "BFL" / "SAI" / "LDM": stored under ComfyUI's names, mapped back
    compute_dtype: torch.dtype
    file_bytes: int
    quantized: int                    # module tensors held as FP8 codes
    kept: int                         # module tensors loaded in high precision
    kept_as_stored: int               # of those, weights held in the file's dtype and cast on each use
    units: list[str] = field(default_factory=list)
    resident_bytes: int = 0
    materialised_bytes: int = 0
    peak_bytes: int = 0
    activations: Activations = Activations.NONE
    inputs: dict[str, int] = field(default_factory=dict)
    log: KernelLog = field(default_factory=KernelLog, repr=False)
    stored_names: dict[str, str] = field(default_factory=dict, repr=False)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    plan: Plan | None = None
    pool_budget: int | None = None
    pool_eviction: str = ""
    pinned: str = "off: no host_memory given"
    pinned_bytes: int = 0
    _streamer: Streamer | None = field(default=None, repr=False)
    _layout: Layout | None = field(default=None, repr=False)

    @property
    def kernels(self) -> dict[str, int]:
        """Kernel path -> weights it produced so far (``weights.KERNELS`` describes each)."""
        return dict(self.log.counts)

    @property
    def residency(self) -> str:
        """Which units stay in memory and why."""
        if self.plan is not None:
            return self.plan.describe()
        if self.mode is Mode.POOLED:
            return (f"{len(self.units)} units kept after they run while the pool's {size(self.pool_budget)} has "
                    f"room ({self.pool_eviction})")
        if self.mode is Mode.STREAMED:
            return f"{len(self.units)} units streamed, one at a time (the next read meanwhile with prefetch)"
        return "everything resident (mode='resident')"

    def summary(self) -> dict:
        return {"path": self.path, "mode": self.mode.value, "device": str(self.device),
                "max_memory": self.plan.budget if self.plan else self.pool_budget, "residency": self.residency,
                "pinned": self.pinned,
                "format": self.format, "renamed": self.renamed,
                "compute_dtype": str(self.compute_dtype).removeprefix("torch."), "file_bytes": self.file_bytes,
                "quantized": self.quantized, "kept": self.kept, "kept_as_stored": self.kept_as_stored,
                "units": len(self.units), "activations": self.activations.value, "inputs": dict(self.inputs),
                "resident_bytes": self.resident_bytes, "peak_bytes": self.peak_bytes,
                "kernels": {KERNELS[k]: n for k, n in self.kernels.items()}}

    def close(self) -> None:
        """Streamed mode: remove the hooks and close the checkpoint (the module can no longer run)."""
        if self._streamer is not None:
            self._streamer.close()
            self._streamer = None
        if self._layout is not None:
            self._layout.close()
            self._layout = None


def load(module: torch.nn.Module, path: str | os.PathLike | TensorSource, mode: str | Mode = "resident",
         compute_dtype: torch.dtype | None = None, *, prefetch: bool = True,
         matmul: str = "dequantize", activations: str | Activations = "none", max_memory: int | str | None = None,
         device: str | torch.device | None = None, pool=None, host_memory: int | str | None = None) -> torch.nn.Module:
    """Load the checkpoint at ``path`` into ``module`` and return it, FP8 weights kept as FP8.

    ``path``: any quantkit output (native, comfy, comfy-legacy, compressed-tensors; a file, a
    folder or a sharded folder) or a plain BF16/FP16/FP32 checkpoint, in any layout quantkit reads;
    or a checkpoint already open (``open_checkpoint(..., component=..., ema=...)``), which stays the
    caller's to close.
    ``module``: the architecture the checkpoint was converted from (a diffusers model, a
    transformers model...), built on the meta device (``empty_weights()``) or holding weights,
    which are replaced and freed. ComfyUI files of a diffusers FLUX.1 / SD3 transformer or UNet
    (BFL / SAI / LDM names) are mapped back to the diffusers module's names.
    ``compute_dtype``: the dtype layers compute in (default: the module's own); FP8 weights are
    dequantized into it on every use, kept weights stored in another dtype cast on every use (memory
    at rest stays the file's size), other kept tensors (biases, norms) cast once.
    ``mode``: "resident" keeps everything in memory; "streamed" reads each block's tensors when it
    runs and drops them after (``quantkit.runtime.streaming``), ``prefetch`` reading the next block
    meanwhile; "budget" keeps as many blocks resident as ``max_memory`` (bytes, or a size such as
    "8GB") holds and streams the rest (``quantkit.runtime.budget``: which blocks stay is decided in
    the model's order and stated in ``module.quantkit_runtime.residency``; a budget that holds
    everything is resident mode, one below the largest block in flight is refused with the
    smallest budget that works); "pooled" is what ``Pool.load`` passes (``pool``: that pool).
    ``module.quantkit_runtime`` (``RuntimeInfo``) says what was loaded and which kernel ran.
    ``device``: where the module runs (default the CPU). Held tensors are placed there; streamed
    blocks are read into host memory and copied there as they run (on CUDA on a side stream,
    overlapping the previous block's compute); FP8 weights are dequantized there. ``host_memory``
    (bytes or "16GB"): streamed blocks, in the model's order, read once into pinned (page-locked)
    host memory while they fit in it and copied to the device from there instead of read from the
    file; skipped, with the reason in ``module.quantkit_runtime.pinned``, where pinning cannot help
    (a model on the CPU) or cannot run (a torch without CUDA).
    ``matmul``: "dequantize" (default: W = q * scale in the compute dtype, then the layer's own op;
    bit-identical to dequantize-then-run) or "fp8" (``nn.Linear`` layers with E4M3 weights multiply
    the stored codes with ``torch._scaled_mm``, inputs quantized with the layer's activation scale).
    ``activations``: how ``nn.Linear`` layers with FP8 weights quantize their input to E4M3 (and back:
    x -> clamp(x / s, -448, 448) -> E4M3 -> * s in float32, then the layer's op; ``weights.InputQuant``):
    "none" (default: weight-only); "file" (what the file implies for each layer, as its client runs
    it: the stored ``input_scale``; ComfyUI's 1.0 for a comfy layer without one and without
    ``full_precision_matrix_mult``; nothing for a full-precision or weight-only layer); "unit" (1.0
    everywhere: ComfyUI without input scales, inputs clamped to +-448); "dynamic" (absmax / 448 per
    token). With ``matmul="fp8"`` inputs are always quantized: "none" then means the file's static
    scale where there is one and a dynamic per-tensor scale elsewhere, and a layer that "file" leaves
    weight-only is dequantized (as ComfyUI does).

    >>> with empty_weights():                                         # doctest: +SKIP
    ...     model = FluxTransformer2DModel.from_config(config)
    >>> load(model, "flux1-dev-fp8.safetensors", mode="streamed", compute_dtype=torch.bfloat16)  # doctest: +SKIP
    """
    mode = _mode(mode)
    budget = _budget(mode, max_memory, pool)
    device = _device(device if device is not None else pool.device if pool is not None else "cpu")
    if getattr(module, "quantkit_runtime", None) is not None:
        raise ValueError("this module was already loaded by quantkit.runtime.load; build a fresh one")
    if matmul not in MATMULS:
        raise ValueError(f"matmul {matmul!r}: use one of {', '.join(MATMULS)}")
    activations = _activations(activations)
    dtype = compute_dtype or own_dtype(module)
    check_compute_dtype(dtype)
    tensors = _tensors(module)
    layout = open_layout(path, {n: (tuple(t.shape), t.dtype) for n, (t, _) in tensors.items()}, type(module).__name__)
    try:
        return _load(module, layout.source.path, mode, dtype, prefetch, tensors, layout, matmul, activations,
                     _Placing(device, budget, pool, budget_bytes(host_memory) if host_memory is not None else None))
    except BaseException:
        layout.close()
        if pool is not None:
            pool.cache.drop_owner(id(module))     # the pool gives back what it counted for the model
        raise


@dataclass(frozen=True)
class _Placing:
    """Where the loaded tensors go: the device, budget mode's max_memory, the pool."""

    device: torch.device
    budget: int | None = None
    pool: object = None
    host_memory: int | None = None


def _device(device) -> torch.device:
    """``device`` as a torch device; "cuda" made "cuda:N" (the current one), as tensors there report it."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _budget(mode: Mode, max_memory, pool) -> int | None:
    if (mode is Mode.POOLED) != (pool is not None):
        raise ValueError("mode='pooled' is what Pool.load passes: load into a quantkit.runtime.Pool" if pool is None
                         else f"a pool loads with mode='pooled', not {mode.value!r}")
    if mode is Mode.BUDGET and max_memory is None:
        raise ValueError("mode='budget' needs max_memory (bytes, or a size such as 8GB)")
    if mode is not Mode.BUDGET and max_memory is not None:
        raise ValueError(f"max_memory applies to mode='budget', not {mode.value!r}")
    return budget_bytes(max_memory) if max_memory is not None else None


def _load(module, path, mode, dtype, prefetch, tensors, layout: Layout, matmul: str,
          activations: Activations, placing: _Placing) -> torch.nn.Module:
    placements = layout.placements
    aliases = _aliases(tensors)
    _check_complete(module, tensors, aliases, placements, layout.source.path)
    holding = _Holding(placements, tensors, dtype)
    info = RuntimeInfo(path, mode, layout.format, layout.renamed, dtype, layout.file_bytes,
                       sum(p.quantized for p in placements.values()),
                       sum(not p.quantized for p in placements.values()), len(holding.stored))
    device = info.device = placing.device
    if placing.pool is not None:
        info.log.slot = placing.pool.slot
    scales = {t: read_scale(layout.source, p).to(device) for t, p in placements.items() if p.quantized}
    inputs = _inputs(module, layout, activations, matmul)
    info.activations = activations
    info.inputs = dict(Counter(q.scheme if q else "dynamic per tensor" if m == "fp8" else "none"
                               for q, m in inputs.values()))
    assign = _assigner(module, tensors, aliases, holding, scales, info.log, matmul, inputs)
    streamed = _streamed(module, placements, aliases) if mode is not Mode.RESIDENT else {}
    streamed = _planned(module, streamed, placements, holding, scales, tensors, mode, prefetch, placing, info)
    in_units = {p.target for ps in streamed.values() for p in ps}

    def read(p: Placement, mapped: bool = False):
        return holding.ready(p, read_data(layout.source, p, mapped))

    for target, p in placements.items():
        if target not in in_units:
            assign(target, read(p).to(device))
    info.stored_names = {t: p.pieces[0].key for t, p in placements.items() if _whole(p, layout.source)}
    if streamed:
        info.units = list(streamed)
        cache = placing.pool.cache if placing.pool is not None else None
        info._streamer = Streamer(module, streamed, lambda p: read(p, mapped=True), assign, holding.nbytes, prefetch,
                                  info, Transfer(device), cache, id(module))
        info._layout = layout
        weakref.finalize(module, info.close)
        if placing.host_memory is not None:
            _pin(info, placing)
    else:
        layout.close()
        if placing.host_memory is not None:
            info.pinned = "nothing streamed: every block is held where the model runs"
    if device.type != "cpu":           # the module's own buffers (position ids, RoPE tables) follow
        type(module)._apply(module, _meta_kept(lambda t: t.to(device)))
    info.resident_bytes = tensor_bytes(module)
    info.peak_bytes = info.resident_bytes
    module.quantkit_runtime = info
    module.__dict__["_apply"] = _Moved(module, info, holding)
    return module


def _pin(info: RuntimeInfo, placing: _Placing) -> None:
    """Streamed units into pinned host memory while ``host_memory`` holds them, or the reason not."""
    reason = pin_skipped(placing.device)
    if reason is not None:
        info.pinned = f"skipped: {reason}"
        return
    streamer = info._streamer
    units = streamer.pin(placing.host_memory)
    info.pinned_bytes = sum(streamer.bytes[u] for u in units)
    info.pinned = (f"{len(units)} of {len(streamer.order)} streamed units in pinned host memory "
                   f"({size(info.pinned_bytes)} of {size(placing.host_memory)}): {ranges(units) or 'none fit'}; "
                   f"copied to {placing.device} from there, not read from the file")


class _Moved:
    """The loaded module's ``_apply`` (what ``.to(dtype)``, ``.half()``, ``.float()``, ``.to(device)``
    run): the held tensors keep their dtype (``weights.held_apply``) and a dtype conversion becomes the
    compute dtype (``RuntimeInfo.compute_dtype``, and what streamed units are read into). Streamed
    mode reads every unit into CPU memory: its placeholders stay meta, and a move off the CPU is refused."""

    def __init__(self, module, info: RuntimeInfo, holding: "_Holding"):
        self.module, self.info, self.holding = weakref.ref(module), info, holding

    def __deepcopy__(self, memo):        # a copy of the model moves the copy (copy.deepcopy maps it in memo)
        import copy
        module = self.module()
        return _Moved(memo.get(id(module), module), copy.deepcopy(self.info, memo), copy.deepcopy(self.holding, memo))

    def __call__(self, fn, recurse: bool = True):
        module = self.module()
        dtype = converted_dtype(fn)          # refused before anything moves
        if self.info.mode is not Mode.RESIDENT:
            device = moved_device(fn, torch.empty(0, device=self.info.device))
            if device != self.info.device:
                raise ValueError(f"a model loaded with mode={self.info.mode.value!r} runs on the device it was "
                                 f"loaded for ({self.info.device}), not on {device}: load it with "
                                 f"device={str(device)!r}, or with mode='resident' to move it")
            fn = _meta_kept(fn)
        type(module)._apply(module, fn, recurse)
        if dtype is not None:
            self.info.compute_dtype = self.holding.dtype = dtype
        return module


def _meta_kept(fn):
    """``fn`` that leaves a meta placeholder on the meta device (its dtype converted as ``fn`` would)."""
    def apply(t):
        if not t.is_meta:
            return fn(t)
        dtype = fn(torch.empty(0, dtype=t.dtype)).dtype
        return t if dtype == t.dtype else t.to(dtype)
    return apply


def _planned(module, streamed: dict[str, list[Placement]], placements, holding: "_Holding", scales, tensors,
             mode: Mode, prefetch: bool, placing: _Placing, info: RuntimeInfo) -> dict[str, list[Placement]]:
    """The units to stream: budget mode keeps ``plan``'s resident ones out; a pool takes the model's
    fixed bytes and reserve (or refuses it). Decided before anything is read."""
    if mode not in (Mode.BUDGET, Mode.POOLED):
        return streamed
    units = {u: sum(holding.nbytes(p) for p in ps) for u, ps in streamed.items()}
    in_units = {p.target for ps in streamed.values() for p in ps}
    fixed = (sum(holding.nbytes(p) for t, p in placements.items() if t not in in_units)
             + sum(s.numel() * s.element_size() for s in scales.values())
             + sum(t.numel() * t.element_size() for n, (t, _) in tensors.items()
                   if n not in placements and not t.is_meta))
    work = _work(placements, holding, placing.device)
    if mode is Mode.BUDGET:
        info.plan = plan(units, fixed, work, placing.budget, prefetch)
        return {u: ps for u, ps in streamed.items() if u not in info.plan.resident}
    depth = 2 if prefetch else 1
    info.pool_budget = placing.pool.cache.budget
    info.pool_eviction = ("eviction 'stable': room made from the units of models idle since this model's "
                          "previous call began, least recently used first; never from this model's own, so the set "
                          "kept is the same from call to call"
                          if placing.pool.cache.eviction.value == "stable" else
                          "eviction 'lru': the least recently used unit of any model in the pool evicted first")
    placing.pool.cache.add_model(id(module), fixed, sum(sorted(units.values(), reverse=True)[:depth]) + work,
                                 type(module).__name__)
    return streamed


def _work(placements, holding: "_Holding", device: torch.device) -> int:
    """Bytes dequantization (or a stored weight's cast) makes at once, at most: the largest such
    weight in the compute dtype, plus, where a weight goes through float32 (``fp8.narrow_route``
    says which do not), one chunk of float32 and int16 work (``weights.dequantized``)."""
    made = [p for t, p in placements.items() if p.quantized or t in holding.stored]
    if not made:
        return 0
    numel = max(p.nbytes // p.dtype.itemsize for p in made)
    widened = [p for p in made
               if p.quantized and not narrow_route(p.fp8.torch_dtype, p.granularity, holding.dtype, device)]
    if not widened:               # per-row scales: one group of rows' float32 work (ROWS_WORK)
        rows = any(p.quantized and p.granularity is Granularity.CHANNEL for p in made)
        return numel * holding.dtype.itemsize + (ROWS_WORK * 4 if rows else 0)
    chunk = min(max(p.nbytes // p.dtype.itemsize for p in widened), CHUNK_ELEMENTS)
    return numel * holding.dtype.itemsize + chunk * 4 + max(chunk, 1 << 16) * 2   # + fp8.decode's int16 scratch


def _whole(p: Placement, source: TensorSource) -> bool:
    """``p`` is one stored tensor as a whole (not rows of a joined one)."""
    if len(p.pieces) != 1:
        return False
    piece, info = p.pieces[0], source.tensors[p.pieces[0].key]
    return piece.src_start == 0 and piece.dst_start == 0 and piece.src_end == (info.shape[0] if info.shape else 1)


class _Holding:
    """In which dtype each tensor is held between calls: FP8 codes as stored; a kept weight (a
    parameter of 2 or more dimensions: Linear, Embedding, Conv) in its stored dtype, cast on each
    use, so that memory at rest stays the file's size in any compute dtype; every other kept float
    (biases, norms: small, and what ``model.dtype`` reads) cast once to the compute dtype."""

    def __init__(self, placements: dict[str, Placement], tensors, dtype: torch.dtype):
        self.placements = placements
        self.dtype = dtype
        self.stored = {t for t, p in placements.items()
                       if not p.quantized and tensors[t][1] and len(p.shape) >= 2
                       and p.dtype.torch.is_floating_point and p.dtype.torch != dtype}

    def held_dtype(self, p: Placement) -> torch.dtype:
        if p.quantized:
            return p.fp8.torch_dtype
        if p.target in self.stored or not p.dtype.torch.is_floating_point:
            return p.dtype.torch
        return self.dtype

    def ready(self, p: Placement, t: torch.Tensor) -> torch.Tensor:
        """``t`` as read from the file -> the tensor held."""
        held = self.held_dtype(p)
        return t if t.dtype == held else t.to(held)

    def nbytes(self, p: Placement) -> int:
        return p.nbytes // p.dtype.itemsize * self.held_dtype(p).itemsize


def _activations(value) -> Activations:
    try:
        return Activations(value)
    except ValueError:
        raise ValueError(f"activations {value!r}: use one of {', '.join(a.value for a in Activations)}") from None


def _inputs(module, layout: Layout, activations: Activations, matmul: str) -> dict[str, tuple]:
    """Module weight name -> (its ``InputQuant`` or None, its matmul) for every FP8 weight of an
    ``nn.Linear``; the file's input scales are read here, once (a few bytes each)."""
    out = {}
    for target, p in layout.placements.items():
        owner, _, attr = target.rpartition(".")
        if not p.quantized or attr != "weight" or not isinstance(module.get_submodule(owner), torch.nn.Linear):
            continue
        wanted = activations is Activations.FILE or (matmul == "fp8" and activations is Activations.NONE)
        fmt = p.input_fp8                    # E4M3; ComfyUI's E5M2 layers quantize their input in E5M2
        static = InputQuant(read_input_scale(layout.source, p), fmt) if wanted and p.implied is Implied.STATIC else None
        if activations is Activations.UNIT:
            quant = InputQuant(1.0, fmt)
        elif activations is Activations.DYNAMIC:
            quant = InputQuant(None, fmt)
        elif activations is Activations.FILE:
            quant = static or (InputQuant(1.0, fmt) if p.implied is Implied.UNIT else None)
        else:
            quant = None
        layer_matmul = matmul
        if matmul == "fp8" and activations is Activations.NONE:
            quant = static                   # the kernel's default: the file's scale, else dynamic per tensor
        elif matmul == "fp8" and quant is None:
            layer_matmul = "dequantize"      # a layer the file leaves weight-only is dequantized, as ComfyUI does
        out[target] = (quant, layer_matmul)
    return out


def _mode(mode) -> Mode:
    try:
        return Mode(mode)
    except ValueError:
        raise ValueError(f"mode {mode!r}: use one of {', '.join(m.value for m in Mode)}") from None


def own_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype of the module's first floating-point parameter (or buffer); float32 if none."""
    for t in (*module.parameters(), *module.buffers()):
        if t.is_floating_point() and t.element_size() > 1:
            return t.dtype
    return torch.float32


def _tensors(module) -> dict[str, tuple[torch.Tensor, bool]]:
    """Every parameter and buffer under each of its names (tied ones under all): name -> (tensor, is_param)."""
    out = {n: (t, True) for n, t in module.named_parameters(remove_duplicate=False)}
    out.update({n: (t, False) for n, t in module.named_buffers(remove_duplicate=False) if n not in out})
    return out


def _aliases(tensors) -> dict[str, tuple[str, ...]]:
    """Name -> the other names of the same tensor (tied weights)."""
    groups: dict[int, list[str]] = {}
    for name, (t, _) in tensors.items():
        groups.setdefault(id(t), []).append(name)
    return {n: tuple(o for o in names if o != n) for names in groups.values() for n in names if len(names) > 1}


def _check_complete(module, tensors, aliases, placements, path) -> None:
    """Every parameter comes from the checkpoint (a tied one through any of its names); a buffer the
    checkpoint lacks is kept from the module, unless it has no values (the meta device)."""
    missing = []
    for name, (t, is_param) in tensors.items():
        if name in placements or any(a in placements for a in aliases.get(name, ())):
            continue
        if is_param or t.is_meta:
            missing.append(name)
    if missing:
        more = f" and {len(missing) - EXAMPLES} more" if len(missing) > EXAMPLES else ""
        buffers_only = all(not tensors[n][1] for n in missing)
        hint = ("build the module with empty_weights() (parameters on the meta device, buffers real), not "
                "under torch.device('meta')" if buffers_only else
                "load the checkpoint into the model it was converted from")
        raise ModelMismatchError(f"{type(module).__name__} needs {', '.join(missing[:EXAMPLES])}{more}, which the "
                                 "checkpoint does not hold", path=path, tensor=missing[0], hint=hint)


def _assigner(module, tensors, aliases, holding: _Holding, scales, log, matmul: str = "dequantize",
              inputs: dict | None = None):
    """``assign(target, value)``: put ``value`` (what ``holding`` holds; None for a meta placeholder)
    in place of module tensor ``target`` and each of its aliases. Holds the module weakly: the
    streamed mode's hooks and finalizer reach it through this, and must not keep it alive."""
    module = weakref.proxy(module)
    inputs = inputs or {}

    def assign(target: str, value) -> None:
        p = holding.placements[target]
        if value is None:
            value = torch.empty(p.shape, dtype=holding.held_dtype(p), device="meta")
        is_param = tensors[target][1]
        if is_param and not p.quantized and target not in holding.stored:
            value = torch.nn.Parameter(value, requires_grad=False)    # one object for every tied name
        for name in (target, *aliases.get(target, ())):
            owner, _, attr = name.rpartition(".")
            sub = module.get_submodule(owner)
            buffer = held_buffer(sub, attr)
            if buffer is not None:                  # held as stored already: new values in place
                sub._buffers[buffer] = value
            elif p.quantized:
                quant, layer_matmul = inputs.get(target, (None, matmul))
                make_quantized(sub, attr, value, scales[target], p.granularity, holding.dtype, log, layer_matmul,
                               quant)
            elif target in holding.stored:
                make_cast(sub, attr, value, holding.dtype)
            elif is_param:
                sub._parameters[attr] = value
            else:
                sub._buffers[attr] = value
    return assign


def _streamed(module, placements: dict[str, Placement], aliases) -> dict[str, list[Placement]]:
    """Unit name -> the placements streamed with it; tensors outside every unit, and tied tensors
    (two names, maybe two units), stay resident."""
    units = {u: [] for u in stream_units(module)}
    owners = sorted(units, key=len, reverse=True)
    for target, p in placements.items():
        if target in aliases:
            continue
        unit = next((u for u in owners if target.startswith(u + ".")), None)
        if unit is not None:
            units[unit].append(p)
    return {u: ps for u, ps in units.items() if ps}


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of the module's parameters and buffers that hold values (meta tensors excluded; shared
    storage counted once)."""
    seen, total = set(), 0
    for t in (*module.parameters(), *module.buffers()):
        if t.is_meta:
            continue
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


@contextmanager
def empty_weights():
    """Build a module with its parameters on the meta device (no memory, no init) and its buffers
    real (position ids, RoPE tables: values a checkpoint does not hold), ready for ``load``. While
    active it patches ``torch.nn.Module.register_parameter`` (as accelerate's ``init_empty_weights``
    does): build in one thread at a time.

    >>> with empty_weights():                                        # doctest: +SKIP
    ...     model = transformers.BertModel(config)
    """
    original = torch.nn.Module.register_parameter

    def register_parameter(self, name, param):
        original(self, name, param)
        if param is not None and not param.is_meta:
            self._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = register_parameter
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original
