"""The naive baseline: what users run today to make an FP8 checkpoint.

    state_dict = safetensors.torch.load_file(src)          # the whole checkpoint in memory
    for each tensor: FP8 with one scale (absmax / 448, clamp, cast) or cast to BF16
    safetensors.torch.save_file(out, dst)                  # the whole output in memory, serialized

Which tensors are quantized follows a name rule that matches quantkit's default policy on the
checkpoints made by make_checkpoint.py (2-D ``.weight`` of linears; attention projections,
embedders, norms and biases stay BF16), and the output layout is the same as quantkit's
``native`` format (``<L>.weight`` FP8 + ``<L>.weight_scale`` float32 scalar), so both produce
the same tensors and the same output size: only the way of getting there differs.

    python benchmarks/naive.py SRC DST
"""
from __future__ import annotations

import sys
import time

import torch
from safetensors.torch import load_file, save_file

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def should_quantize(key: str, t: torch.Tensor) -> bool:
    if t.dim() != 2 or not key.endswith(".weight") or not t.is_floating_point():
        return False
    modules = key.split(".")[:-1]
    return not any("attn" in m or "embed" in m for m in modules)


def quantize_per_tensor(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    amax = w.abs().max().float()
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale.reshape(())


def convert(src: str, dst: str) -> dict:
    t0 = time.perf_counter()
    sd = load_file(src)
    out: dict[str, torch.Tensor] = {}
    n_q = 0
    for key, t in sd.items():
        if should_quantize(key, t):
            out[key], out[key + "_scale"] = quantize_per_tensor(t)
            n_q += 1
        elif t.is_floating_point():
            out[key] = t.to(torch.bfloat16)
        else:
            out[key] = t
    save_file(out, dst, metadata={"format": "pt"})
    return {"seconds": time.perf_counter() - t0, "quantized": n_q, "tensors": len(sd)}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    r = convert(*argv)
    print(f"naive: {r['quantized']} of {r['tensors']} tensors quantized in {r['seconds']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
