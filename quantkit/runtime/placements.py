"""Where each of a module's tensors lies in a checkpoint: the runtime's one adapter to the floors below.

Everything the runtime needs from the read and format stages is imported here and nowhere else
in ``quantkit.runtime`` (``open_checkpoint``, ``detect_format(...).stored``, the ComfyUI renaming
tables), so a move of those modules touches this file only.

A ``Placement`` says how to fill one module tensor (a parameter or buffer, by its dotted name):
from which stored tensor's rows (``Piece``), and with which FP8 scale. A checkpoint under the
module's own names gives one piece per tensor. A ComfyUI file of a diffusers FLUX.1 / SD3
transformer or UNet is stored under BFL's / SAI's / LDM's names (``quantkit.comfy_names``): the
renaming table is rebuilt from the *module's* tensor shapes (it needs row counts only, no source
checkpoint), and inverted, so a joined ``qkv`` gives each of ``to_q``, ``to_k``, ``to_v`` its rows
(each keeping the joined per-tensor scale) and a swapped modulation gets its halves back.

A quantized placement also says what its file implies for the layer's input on a client that runs
FP8 matmuls (``Implied``): the stored static ``input_scale`` (any format's read-back names its key,
``StoredTensor.input_scale_key``; the rows of a joined layer share it, as they share its input);
ComfyUI's scale 1.0 for a layer that has neither an input scale nor ``full_precision_matrix_mult``;
or nothing (weight-only: ``full_precision_matrix_mult``, or a format without activation scales).
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from ..checkpoint import open_checkpoint
from ..comfy_names import flux_to_bfl, is_diffusers_flux, is_diffusers_sd3, is_diffusers_unet, sd3_to_sai, unet_to_ldm
from ..dtypes import DType, Kind, from_torch
from ..errors import FormatError, ModelMismatchError, UnsupportedInputError
from ..formats import StoredTensor, detect_format
from ..fp8 import E4M3FN, FP8Format, Granularity
from ..reader import TensorInfo, TensorSource

# Diffusers models whose ComfyUI files carry other names: (what, names, detector, table builder).
_RENAMED = (("FLUX.1", "BFL", is_diffusers_flux, flux_to_bfl), ("SD3", "SAI", is_diffusers_sd3, sd3_to_sai),
            ("UNet", "LDM", is_diffusers_unet, unet_to_ldm))
EXAMPLES = 3
_DECODER = "model."


class Implied(enum.Enum):
    """What a quantized layer's entry in its file implies for the layer's input."""

    NONE = "none"       # weight-only: dequantized weight, input as it comes
    STATIC = "static"   # quantized to E4M3 with the stored input scale (Placement.input_scale_key)
    UNIT = "unit"       # quantized with scale 1.0: ComfyUI's FP8 matmul without an input scale


def implied(s: StoredTensor) -> Implied:
    """What ``s`` implies for its layer's input. ComfyUI (``comfy`` and ``comfy-legacy`` read-back:
    ``full_precision_matrix_mult`` is set) dequantizes a layer that asks for full precision, even
    with an input scale; it quantizes the input of any other FP8 layer, with scale 1.0 when the
    file has none. Other formats quantize inputs only with a static scale they store."""
    full_precision = getattr(s, "full_precision_matrix_mult", None)
    if full_precision:
        return Implied.NONE
    if s.input_scale_key is not None:
        return Implied.STATIC
    return Implied.UNIT if full_precision is not None else Implied.NONE


@dataclass(frozen=True)
class Piece:
    """Rows ``[src_start, src_end)`` of the stored tensor ``key`` fill the target from row ``dst_start``."""

    key: str
    src_start: int
    src_end: int
    dst_start: int


@dataclass(frozen=True)
class Placement:
    """How one module tensor is stored: its pieces (stored dtype ``dtype``) and, when quantized,
    the key of its scale, the scale's granularity and the FP8 encoding."""

    target: str
    shape: tuple[int, ...]
    dtype: DType
    pieces: tuple[Piece, ...]
    scale_key: str | None = None
    granularity: Granularity | None = None
    fp8: FP8Format | None = None
    implied: Implied = Implied.NONE
    input_scale_key: str | None = None     # with Implied.STATIC: the stored static activation scale
    input_fp8: FP8Format = E4M3FN          # what the file's client quantizes the layer's input to

    @property
    def quantized(self) -> bool:
        return self.scale_key is not None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class Layout:
    """An opened checkpoint and where each module tensor lies in it."""

    source: TensorSource
    format: str                       # "native", "comfy", ..., or "plain" (no FP8 tensors)
    renamed: str | None               # "BFL" / "SAI" / "LDM" when stored under ComfyUI's names
    placements: dict[str, Placement]  # module tensor name -> placement
    file_bytes: int
    owned: bool = True                # opened here (closed here) or handed in by the caller

    def close(self) -> None:
        if self.owned:
            self.source.close()


def open_layout(path, targets: dict[str, tuple[tuple[int, ...], object]], module_name: str) -> Layout:
    """Open ``path`` (any layout ``open_checkpoint`` reads: a file, a folder, a shard index; or a
    ``TensorSource`` already open, such as a pipeline's component, which the caller keeps and closes)
    and place every stored tensor on one of ``targets`` (module tensor name -> (shape, torch dtype)).

    Raises ``ModelMismatchError`` naming the key and ``module_name`` for a stored tensor the module
    has no place for, or whose shape differs; the caller checks what the module lacks."""
    owned = not isinstance(path, TensorSource)
    source = open_checkpoint(path, ema=None) if owned else path
    try:
        fmt, stored = _stored(source)
        table, renamed = _renaming(stored, targets)
        placements = _place(source, stored, table, targets, module_name)
        return Layout(source, fmt, renamed, placements, getattr(source, "file_size", 0), owned)
    except BaseException:
        if owned:
            source.close()
        raise


def _stored(source) -> tuple[str, dict[str, StoredTensor]]:
    """(format name, source key -> how it is stored); a checkpoint without FP8 tensors is plain."""
    if not any(i.dtype.kind is Kind.FP8 for i in source.tensors.values()):
        return "plain", {k: StoredTensor(k, k) for k in source.tensors}
    fmt = detect_format(source)
    return fmt.name, fmt.stored(source)      # a broken file raises the format's FormatError


def _renaming(stored: dict[str, StoredTensor], targets) -> tuple[dict[str, list], str | None]:
    """Stored name -> [(target, first row, end row)], and the naming it undoes (None: the module's own)."""
    own = {k: [(k, 0, _rows(targets[k][0]))] for k in stored if k in targets}
    best, label = own, None
    for _, names, detect, build in _RENAMED:
        if len(own) == len(stored) or not detect(targets):
            continue
        infos = {n: _info(n, shape, dtype) for n, (shape, dtype) in targets.items()}
        try:
            table = build(infos)
        except UnsupportedInputError:         # the module is not the whole model the table describes
            continue
        hits = {k: parts for k, parts in table.items() if k in stored}
        if len(hits) > len(best):
            best, label = hits, names
    # ComfyUI's text-encoder files hold a bare decoder (transformers' Qwen3Model: layers.*) as model.*
    # (quantkit.comfy_encoder_names): the module's own names under one more prefix.
    prefixed = {k: [(k[len(_DECODER):], 0, _rows(targets[k[len(_DECODER):]][0]))] for k in stored
                if k.startswith(_DECODER) and k[len(_DECODER):] in targets}
    if len(prefixed) > len(best):
        best, label = prefixed, "ComfyUI text encoder"
    return best, label


def _place(source, stored, table, targets, module_name: str) -> dict[str, Placement]:
    unplaced = [k for k in stored if k not in table]
    if unplaced:
        more = f" and {len(unplaced) - EXAMPLES} more" if len(unplaced) > EXAMPLES else ""
        raise ModelMismatchError(f"{', '.join(unplaced[:EXAMPLES])}{more}: no such tensor in {module_name}",
                                 path=source.path, tensor=unplaced[0],
                                 hint="load the checkpoint into the model it was converted from")
    pieces: dict[str, list[Piece]] = {}
    scales: dict[str, StoredTensor] = {}
    for key, parts in table.items():
        s, row = stored[key], 0
        for target, r0, r1 in parts:
            pieces.setdefault(target, []).append(Piece(s.data_key, row, row + r1 - r0, r0))
            row += r1 - r0
            if s.scale_key is not None:
                scales[target] = s
        info = source.tensors[s.data_key]
        if row != _rows(info.shape):
            raise ModelMismatchError(f"{key} has {_rows(info.shape)} rows; {module_name} takes {row}",
                                     path=source.path, tensor=key,
                                     hint="load the checkpoint into the model it was converted from")
    out = {}
    for target, ps in pieces.items():
        first = source.tensors[ps[0].key]
        shape = tuple(targets[target][0])
        whole = len(ps) == 1 and (ps[0].src_start, ps[0].src_end) == (0, _rows(first.shape))
        got = first.shape if whole else (sum(p.src_end - p.src_start for p in ps), *first.shape[1:])
        if tuple(got) != shape and not (whole and math.prod(got) == math.prod(shape) == 1):
            raise ModelMismatchError(f"{first.name} is {list(got)}; {module_name}.{target} is {list(shape)}",
                                     path=source.path, tensor=first.name,
                                     hint="load the checkpoint into the model it was converted from")
        s = scales.get(target)
        if s is not None and not whole and s.granularity is not Granularity.TENSOR:
            # Rows of a joined tensor keep its scale only when there is one scale for all of them.
            raise ModelMismatchError(f"{s.data_key} is joined from several tensors of {module_name} but has "
                                     f"{s.granularity.value} scales", path=source.path, tensor=s.data_key,
                                     hint="a joined layer needs one scale per tensor")
        out[target] = Placement(target, shape, first.dtype, tuple(ps),
                                s.scale_key if s else None, s.granularity if s else None, s.fp8 if s else None,
                                implied(s) if s else Implied.NONE,
                                s.input_scale_key if s is not None and implied(s) is Implied.STATIC else None,
                                s.input_fp8 if s is not None else E4M3FN)
    return out


def read_data(source: TensorSource, p: Placement, mapped: bool = False):
    """The stored values of ``p`` (FP8 codes or the kept tensor as stored), as one CPU tensor.

    ``mapped``: where ``p`` is one stored tensor's contiguous rows and the source can map them, the
    tensor is the file's pages themselves (``map_bytes``, populated by the calling thread; unmapped
    when the last reference goes): no copy, and none of the page faults of fresh memory, which cost
    a streamed forward more than reading the bytes does. Otherwise (rows joined from several
    tensors, a source that cannot map) a copy, read with ``read_into``."""
    import torch
    row_bytes = p.nbytes // _rows(p.shape) if p.nbytes else 0
    if mapped and p.nbytes and len(p.pieces) == 1 and p.pieces[0].dst_start == 0:
        piece = p.pieces[0]
        raw = source.map_bytes(source.tensors[piece.key], piece.src_start * row_bytes, p.nbytes, populate=True)
        if raw is not None:
            return raw.view(p.dtype.torch).reshape(p.shape)
    buf = torch.empty(p.nbytes, dtype=torch.uint8)
    view = buf.numpy()
    for piece in p.pieces:
        info = source.tensors[piece.key]
        n = (piece.src_end - piece.src_start) * row_bytes
        start = piece.dst_start * row_bytes
        source.read_into(info, piece.src_start * row_bytes, view[start:start + n])
    return buf.view(p.dtype.torch).reshape(p.shape)


def read_scale(source: TensorSource, p: Placement):
    """The scale of a quantized placement, as stored (a small tensor)."""
    return source.read_tensor(source.tensors[p.scale_key])


def read_input_scale(source: TensorSource, p: Placement) -> float:
    """The static activation scale of ``p`` (one positive finite float), refused otherwise: a zero,
    negative or non-finite scale divides every input into NaN or Inf."""
    info = source.tensors.get(p.input_scale_key)
    value = source.read_tensor(info).float().reshape(-1) if info is not None else None
    if value is None or value.numel() != 1 or not (math.isfinite(float(value[0])) and float(value[0]) > 0):
        shown = "missing" if value is None else f"{value.tolist()[:4]}"
        raise FormatError(f"an input scale must be one positive finite float, not {shown}", path=source.path,
                          tensor=p.input_scale_key, hint="re-run quantkit convert --stats with calibrated statistics")
    return float(value[0])


def _rows(shape) -> int:
    return shape[0] if len(shape) else 1


def _info(name: str, shape, dtype) -> TensorInfo:
    d = from_torch(dtype)
    return TensorInfo(name, d, tuple(shape), 0, math.prod(shape) * d.itemsize)
