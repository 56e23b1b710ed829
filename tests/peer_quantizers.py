"""Third-party FP8 weight quantizers wrapped as ``fn(x) -> (codes, scale)`` for the kit's tests.

compressed-tensors is a test dependency; torchao and comfy-kitchen wrappers import lazily (the
tests skip them where the package is absent).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _group_min_max(w: torch.Tensor, strategy: str):
    """min and max per tensor / row / 128x128 tile, as compressed-tensors' min-max observer sees them."""
    if w.numel() == 0:                       # no rows: nothing to observe
        shape = {"tensor": (), "channel": (w.shape[0], 1), "block": (0, -(-w.shape[1] // 128))}[strategy]
        return torch.zeros(shape, dtype=w.dtype), torch.zeros(shape, dtype=w.dtype)
    if strategy == "tensor":
        return w.amin(), w.amax()
    if strategy == "channel":
        return w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    rows, cols = w.shape
    tiles = F.pad(w, (0, -cols % 128, 0, -rows % 128))
    tiles = tiles.reshape(tiles.shape[0] // 128, 128, tiles.shape[1] // 128, 128)
    return tiles.amin(dim=(1, 3)), tiles.amax(dim=(1, 3))


def compressed_tensors_fp8(strategy: str, *, float32_scales: bool = True):
    """compressed-tensors' FP8 weight quantization (calculate_qparams + quantize), per
    ``strategy`` ("tensor", "channel", "block"). With ``float32_scales`` the weight is observed
    and quantized in float32; without, in its own dtype (llm-compressor's default: bf16 scales)."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy=strategy,
                            block_structure=[128, 128] if strategy == "block" else None)

    def fn(x):
        w = x.float() if float32_scales else x
        lo, hi = _group_min_max(w, strategy)
        scale, zero_point = calculate_qparams(lo, hi, args)
        if w.numel() == 0:
            return torch.empty(w.shape, dtype=torch.float8_e4m3fn), scale.float()
        codes = quantize(w, scale, zero_point, args, dtype=torch.float8_e4m3fn)
        return codes, scale.float()
    return fn


def torchao_from_hp(granularity: str, *, float32_input: bool = False):
    """torchao's ``Float8Tensor.from_hp`` (what Float8WeightOnlyConfig runs) per tensor or row."""
    from torchao.quantization import Float8Tensor
    from torchao.quantization.granularity import PerRow, PerTensor

    gran = PerTensor() if granularity == "tensor" else PerRow()

    def fn(x):
        t = Float8Tensor.from_hp(x.float() if float32_input else x, granularity=gran)
        return t.qdata, t.scale
    return fn


def comfy_kitchen_fp8(x):
    """ComfyUI's runtime FP8 quantize (comfy-kitchen TensorCoreFP8Layout, scale recalculated)."""
    from comfy_kitchen.tensor import TensorCoreFP8Layout
    codes, params = TensorCoreFP8Layout.quantize(x)
    return codes, params.scale
