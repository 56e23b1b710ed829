"""GPTQ on the FP8 grid: round a linear's weight column by column, each column's rounding error
pushed onto the columns not yet rounded, weighted by the layer's input Hessian.

Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", Algorithm 1, as AutoGPTQ and llm-compressor run it:

- ``H = sum x x^T`` over the calibration tokens of the layer's input (``hessian_update``); columns
  whose input was always 0 ("dead") get ``H[i, i] = 1`` and no coupling;
- damping: ``percdamp * mean(diag H)`` added to the diagonal (1 % by default, the paper's);
  when the Cholesky still fails, the damping grows tenfold, up to ``DAMP_TRIES`` times (as
  GPTQModel's automatic damping increment does), then ``GPTQError``;
- ``U = cholesky(H^-1)^T`` (upper), and the columns in blocks of ``block_size`` (128): inside a
  block each column's error updates the block's remaining columns at once; at the end of a block
  the block's errors update every later column in one matrix product ("lazy batch updates").
- column order: by decreasing ``diag H`` by default (``ACT_ORDER``: the paper's "act-order",
  llm-compressor's static actorder); ``act_order=False`` keeps the stored order.
  The scales are fixed before rounding, so the order never changes a scale.

What differs from the integer GPTQ: the grid. Each column is rounded exactly once to the FP8 codes
of its own scale (``quantkit.fp8``'s scales: per tensor, per row, or per 128x128 tile, fixed
beforehand from absmax / max as round-to-nearest uses), clamped to the FP8 range before the cast.
The codes are ordinary E4M3 codes with those ordinary scales: nothing downstream knows GPTQ ran.

Hessians are float32 (the reference's precision); a FLUX MLP input's (12288 wide) is 0.6 GB. They
travel in a stats sidecar packed as their upper triangle by rows (``pack_rows`` / ``unpack``).

    >>> w = torch.tensor([[1.0, 0.3], [-0.2, 0.5]])
    >>> s = fp8.scale_from_absmax(fp8.absmax(w, Granularity.TENSOR))
    >>> q = gptq_quantize(w, torch.eye(2), s, Granularity.TENSOR)
    >>> bool((q.view(torch.uint8) == fp8.quantize(w, s).view(torch.uint8)).all())   # H = I: nearest
    True
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from quantkit import fp8
from quantkit.dtypes import E4M3FN, FP8Format, Granularity
from quantkit.errors import QuantkitError

PERCDAMP = 0.01          # the paper's and llm-compressor's default dampening fraction
BLOCK_SIZE = 128         # columns per lazy batch update (the paper's B)
# Column order: act-order (decreasing diag H: the columns whose inputs carry the most energy are
# rounded first, while the most columns remain to absorb their error). The scales are fixed before
# rounding, so the order costs nothing in the format. On MiniLM it raised the held-out mean cosine over
# the stored order by 0.9e-4 to 2.7e-4 in all 8 calibrations, the minimum in 7 (benchmarks/README.md, GPTQ).
ACT_ORDER = True
DAMP_TRIES = 4           # 1 %, 10 %, 100 %, 1000 % of the mean diagonal before giving up


class GPTQError(QuantkitError):
    """GPTQ could not run on a layer (its damped Hessian is not positive definite)."""


def hessian_update(hessian: torch.Tensor, x: torch.Tensor) -> int:
    """Add ``x^T x`` of the inputs ``x`` (``[..., features]``) to ``hessian`` (float32, in place);
    returns the number of input rows (tokens) added.

    >>> h = torch.zeros(2, 2); hessian_update(h, torch.tensor([[1.0, 2.0], [0.0, 1.0]])); h.tolist()
    2
    [[1.0, 2.0], [2.0, 5.0]]
    """
    rows = x.detach().reshape(-1, x.shape[-1]).float()
    hessian.addmm_(rows.T, rows)
    return rows.shape[0]


def inverse_factor(hessian: torch.Tensor, percdamp: float = PERCDAMP) -> tuple[torch.Tensor, float]:
    """(``U``, the damping fraction used): the upper Cholesky factor of ``(H + damp I)^-1``, the
    matrix GPTQ's updates read. ``hessian`` is not changed; at most two more matrices its size are
    held at once (a FLUX proj_out's, 15360 wide, is 0.94 GB)."""
    diag = hessian.diagonal().float()
    dead = diag == 0
    # A column whose input never moved carries no information: decouple it (it rounds to nearest).
    mean = float(torch.where(dead, torch.ones_like(diag), diag).mean()) if diag.numel() else 1.0
    fraction = percdamp
    for _ in range(DAMP_TRIES):
        damped = hessian.float().clone()
        damped.diagonal()[dead] = 1.0
        damped.diagonal().add_(fraction * mean)
        lower, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            del lower
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if int(info) == 0 and bool(torch.isfinite(upper.diagonal()).all()):
                return upper, fraction
        fraction *= 10
    raise GPTQError(f"the layer's input Hessian is not positive definite even with {fraction / 10:g} of its "
                    "mean diagonal added", hint="calibrate on more inputs, or convert with --rounding nearest")


def column_scale(scale: torch.Tensor, column: int, rows: int, granularity: Granularity) -> torch.Tensor:
    """The scale of every element of column ``column`` (a scalar, or ``[rows]``), as ``fp8.quantize`` uses it."""
    scale = scale.float()
    if granularity is Granularity.TENSOR:
        return scale.reshape(())
    if granularity is Granularity.CHANNEL:
        return scale.reshape(rows)
    return scale[:, column // fp8.BLOCK_SIZE].repeat_interleave(fp8.BLOCK_SIZE)[:rows]


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor,
                  granularity: Granularity = Granularity.TENSOR, fmt: FP8Format = E4M3FN, *,
                  percdamp: float = PERCDAMP, block_size: int = BLOCK_SIZE, act_order: bool = ACT_ORDER) -> torch.Tensor:
    """FP8 codes of ``weight`` ([out, in]) under the fixed ``scale`` (shaped as ``fp8.scale_shape``),
    rounded by GPTQ with the input Hessian ``hessian`` ([in, in]); the same shape as ``weight``.
    ``weight`` and ``hessian`` are not changed."""
    if weight.dim() != 2 or tuple(hessian.shape) != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"weight {list(weight.shape)} and Hessian {list(hessian.shape)} do not match")
    rows, cols = weight.shape
    order = torch.argsort(hessian.diagonal(), descending=True, stable=True) if act_order else None
    w = weight.float().clone()
    if order is None:
        upper, _ = inverse_factor(hessian, percdamp)
    else:
        w = w[:, order]
        upper, _ = inverse_factor(hessian.float()[order][:, order], percdamp)
    codes = torch.empty(rows, cols, dtype=fmt.torch_dtype)
    top = fmt.max_finite
    for b0 in range(0, cols, block_size):
        b1 = min(b0 + block_size, cols)
        block = w[:, b0:b1].clone()
        errors = torch.zeros(rows, b1 - b0)
        u = upper[b0:b1, b0:b1]
        for j in range(b1 - b0):
            original = b0 + j if order is None else int(order[b0 + j])
            s = column_scale(scale, original, rows, granularity)
            col = block[:, j]
            # Clamp before the cast: an update can carry a value past the scale's range.
            q = (col / s).clamp_(-top, top).to(fmt.torch_dtype)
            codes[:, b0 + j] = q
            error = (col - q.float() * s) / u[j, j]
            errors[:, j] = error
            coupling = u[j, j + 1:]
            # A zero coupling row (diagonal H, dead columns) moves nothing: skipped, so H = I is
            # nearest bit for bit (x - 0 * e would turn a -0 weight into +0).
            if coupling.numel() and bool(coupling.any()):
                block[:, j + 1:].addr_(error, coupling, alpha=-1)
        rest = upper[b0:b1, b1:]
        if rest.numel() and bool(rest.any()):
            w[:, b1:].addmm_(errors, rest, alpha=-1)
    if order is not None:
        codes = codes[:, torch.argsort(order)].contiguous()
    return codes


def packed_size(features: int) -> int:
    """Elements of the packed upper triangle of a ``features`` x ``features`` matrix."""
    return features * (features + 1) // 2


def features_of(packed: int) -> int:
    """The matrix width a packed upper triangle of ``packed`` elements comes from (ValueError if none)."""
    n = (math.isqrt(8 * packed + 1) - 1) // 2
    if packed_size(n) != packed:
        raise ValueError(f"{packed} elements are no packed upper triangle")
    return n


def pack_rows(hessian: torch.Tensor) -> Iterator[torch.Tensor]:
    """The upper triangle of the symmetric ``hessian``, row by row (``H[i, i:]``, contiguous views:
    written to a file one after the other, no copy of the matrix is made)."""
    for i in range(hessian.shape[0]):
        yield hessian[i, i:]


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper triangle ``pack_rows`` wrote (float32).

    >>> h = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
    >>> unpack(torch.cat(list(pack_rows(h)))).tolist()
    [[2.0, 1.0], [1.0, 3.0]]
    """
    n = features_of(packed.numel())
    out = torch.empty(n, n, dtype=torch.float32)
    start = 0
    for i in range(n):
        row = packed[start:start + n - i]
        out[i, i:] = row
        out[i:, i] = row
        start += n - i
    return out
