"""Generate a synthetic BF16 safetensors checkpoint with diffusion-transformer (FLUX-like) shapes.

The file is written as a stream: the header (all shapes are known up front) and then each
tensor, a chunk at a time, so memory stays at a fixed ~200 MB whatever the target size.

Layout (diffusers FLUX naming, hidden size H = 3072 by default, shapes are torch [out, in]):

    x_embedder.weight                              [H, 64]      embedding     -> kept BF16
    context_embedder.weight                        [H, 4096]    embedding     -> kept
    time_text_embed.timestep_embedder.linear_{1,2} [H, 256|H]   embedding     -> kept
    transformer_blocks.N.norm1.linear.weight       [3H, H]      AdaLN linear  -> FP8  (9216x3072)
    transformer_blocks.N.attn.norm_{q,k}.weight    [128]        norm          -> kept
    transformer_blocks.N.attn.to_{q,k,v}.weight    [H, H]       attention     -> kept (3072x3072)
    transformer_blocks.N.attn.to_out.0.weight      [H, H]       attention     -> kept
    transformer_blocks.N.norm2.weight              [H]          norm          -> kept
    transformer_blocks.N.ff.net.0.proj.weight      [4H, H]      MLP linear    -> FP8  (12288x3072)
    transformer_blocks.N.ff.net.2.weight           [H, 4H]      MLP linear    -> FP8  (3072x12288)
    (every linear has its 1-D .bias)
    norm_out.linear.weight [2H, H], proj_out.weight [64, H]     linears       -> FP8

One block is ~283 MB at H = 3072; blocks are added (the last one possibly partial, cut at a
tensor boundary) until the file reaches ``--size-gb`` (decimal GB, 1e9 bytes). About 73 % of
the bytes are in tensors that quantkit's default policy quantizes.

Values: 2-D weights are Gaussian (std 0.02) with a few outliers (8 per weight, 10-40 sigma,
random sign and place), so absmax and scales differ from tensor to tensor; biases are small
Gaussians, norm weights are 1 + small noise. Everything is deterministic for a given ``--seed``.

Speed: by default the Gaussian values come from a pool of 64 Mi fresh normal values (numpy's
seeded PCG64 ``standard_normal``, rounded to BF16 round-to-nearest-even: 128 MB, made once in
~2 s), and every chunk of every weight is a slice of that pool at a seeded random offset,
written zero-copy: generation runs at the speed the disk accepts writes (~0.4-1 GB/s here, a
9 GB file in ~25 s). ``--fresh`` draws every chunk fresh instead (i.i.d. values, ~0.1 GB/s).
Only numpy is needed (no torch), so the generator starts fast and stays small (~300 MB).

    python benchmarks/make_checkpoint.py /tmp/qk/flux-3gb.safetensors --size-gb 3
    python benchmarks/make_checkpoint.py /tmp/qk/flux-24gb.safetensors --size-gb 24   # ~24 GB of disk

A file that already exists with the same parameters (recorded in its ``__metadata__``) is
reused, not regenerated, unless ``--force``.
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time
from dataclasses import dataclass

import numpy as np

GB = 1e9
POOL_ELEMENTS = 64 << 20          # 128 MB of BF16
CHUNK_ELEMENTS = 16 << 20         # 32 MB of BF16 written per call
WEIGHT_STD = 0.02
OUTLIERS_PER_WEIGHT = 8
GENERATOR_VERSION = "1"


@dataclass(frozen=True)
class Spec:
    name: str
    shape: tuple[int, ...]
    kind: str                     # "weight" (2-D Gaussian + outliers), "bias", "norm"

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * 2     # BF16


def block_specs(n: int, hidden: int, head_dim: int = 128) -> list[Spec]:
    p = f"transformer_blocks.{n}."
    h = hidden
    out = [Spec(p + "norm1.linear.weight", (3 * h, h), "weight"), Spec(p + "norm1.linear.bias", (3 * h,), "bias"),
           Spec(p + "attn.norm_q.weight", (head_dim,), "norm"), Spec(p + "attn.norm_k.weight", (head_dim,), "norm")]
    for proj in ("to_q", "to_k", "to_v", "to_out.0"):
        out += [Spec(p + f"attn.{proj}.weight", (h, h), "weight"), Spec(p + f"attn.{proj}.bias", (h,), "bias")]
    out += [Spec(p + "norm2.weight", (h,), "norm"),
            Spec(p + "ff.net.0.proj.weight", (4 * h, h), "weight"), Spec(p + "ff.net.0.proj.bias", (4 * h,), "bias"),
            Spec(p + "ff.net.2.weight", (h, 4 * h), "weight"), Spec(p + "ff.net.2.bias", (h,), "bias")]
    return out


def layout(size_bytes: int, hidden: int = 3072) -> list[Spec]:
    """Tensor specs in file order: embedders, blocks until ``size_bytes`` is reached, output head."""
    h = hidden
    head = [Spec("x_embedder.weight", (h, 64), "weight"), Spec("x_embedder.bias", (h,), "bias"),
            Spec("context_embedder.weight", (h, 4096 if h >= 1024 else 4 * h), "weight"),
            Spec("context_embedder.bias", (h,), "bias"),
            Spec("time_text_embed.timestep_embedder.linear_1.weight", (h, 256), "weight"),
            Spec("time_text_embed.timestep_embedder.linear_1.bias", (h,), "bias"),
            Spec("time_text_embed.timestep_embedder.linear_2.weight", (h, h), "weight"),
            Spec("time_text_embed.timestep_embedder.linear_2.bias", (h,), "bias")]
    tail = [Spec("norm_out.linear.weight", (2 * h, h), "weight"), Spec("norm_out.linear.bias", (2 * h,), "bias"),
            Spec("proj_out.weight", (64, h), "weight"), Spec("proj_out.bias", (64,), "bias")]
    specs = list(head)
    total = sum(s.nbytes for s in head + tail)
    n = 0
    while total < size_bytes:
        for s in block_specs(n, h):
            if total >= size_bytes:
                break
            specs.append(s)
            total += s.nbytes
        n += 1
    return specs + tail


def encode_header(specs: list[Spec], metadata: dict[str, str]) -> bytes:
    doc: dict = {"__metadata__": metadata}
    off = 0
    for s in specs:
        doc[s.name] = {"dtype": "BF16", "shape": list(s.shape), "data_offsets": [off, off + s.nbytes]}
        off += s.nbytes
    body = json.dumps(doc, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body


def read_metadata(path: str) -> dict | None:
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                return None
            return json.loads(f.read(n)).get("__metadata__", {})
    except (OSError, ValueError, struct.error):
        return None


def _write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view)
        view = view[n:]


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> BF16 bit patterns (uint16), round to nearest even (finite inputs). Clobbers ``x``."""
    u = x.view(np.uint32)
    u += np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
    return (u >> np.uint32(16)).astype(np.uint16)


def gaussian_bf16(rng: np.random.Generator, n: int, std: float, mean: float = 0.0) -> np.ndarray:
    x = rng.standard_normal(n, dtype=np.float32)
    x *= np.float32(std)
    if mean:
        x += np.float32(mean)
    return to_bf16(x)


def generate(path: str, size_gb: float, *, seed: int = 0, hidden: int = 3072, fresh: bool = False,
             force: bool = False, quiet: bool = True) -> dict:
    """Write the checkpoint (or reuse an identical one); returns a summary dict."""
    size_bytes = int(size_gb * GB)
    specs = layout(size_bytes, hidden)
    metadata = {"format": "pt", "generator": "quantkit-benchmarks/make_checkpoint.py",
                "generator.version": GENERATOR_VERSION, "generator.seed": str(seed),
                "generator.size_gb": repr(float(size_gb)), "generator.hidden": str(hidden),
                "generator.values": "fresh" if fresh else "pool"}
    return write_specs(path, specs, metadata, seed=seed, fresh=fresh, force=force, quiet=quiet)


def write_specs(path: str, specs: list[Spec], metadata: dict[str, str], *, seed: int = 0, fresh: bool = False,
                force: bool = False, quiet: bool = True) -> dict:
    """Stream ``specs`` (BF16 values as the module docstring says) into the safetensors file ``path``,
    or reuse an identical one (same size and metadata); returns a summary dict."""
    header = encode_header(specs, metadata)
    expected_size = len(header) + sum(s.nbytes for s in specs)
    summary = {"path": path, "bytes": expected_size, "tensors": len(specs), "reused": False, "seconds": 0.0}
    if not force and os.path.exists(path) and os.path.getsize(path) == expected_size \
            and read_metadata(path) == metadata:
        summary["reused"] = True
        return summary

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)                        # offsets, outliers
    values = np.random.default_rng([seed, 1])                # Gaussian values
    pool = None
    if not fresh:
        pool = np.empty(POOL_ELEMENTS, dtype=np.uint16)
        step = 8 << 20
        for i in range(0, POOL_ELEMENTS, step):
            pool[i:i + step] = gaussian_bf16(values, min(step, POOL_ELEMENTS - i), WEIGHT_STD)

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.partial.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    patches: list[tuple[int, bytes]] = []   # (file offset, 2 bytes): outliers, written at the end
    try:
        _write_all(fd, header)
        offset = len(header)
        for s in specs:
            if s.kind == "weight":
                left = s.numel
                while left:
                    n = min(left, CHUNK_ELEMENTS)
                    if pool is None:
                        _write_all(fd, gaussian_bf16(values, n, WEIGHT_STD))
                    else:
                        start = int(rng.integers(0, POOL_ELEMENTS - n + 1))
                        _write_all(fd, pool[start:start + n])
                    left -= n
                k = min(OUTLIERS_PER_WEIGHT, s.numel)
                where = rng.choice(s.numel, size=k, replace=False)
                mags = rng.uniform(10, 40, size=k) * WEIGHT_STD * rng.choice([-1.0, 1.0], size=k)
                coded = to_bf16(mags.astype(np.float32))
                patches += [(offset + 2 * int(w), struct.pack("<H", int(c))) for w, c in zip(where, coded)]
            elif s.kind == "norm":
                _write_all(fd, gaussian_bf16(values, s.numel, 0.05, mean=1.0))
            else:
                _write_all(fd, gaussian_bf16(values, s.numel, 0.01))
            offset += s.nbytes
        for pos, data in patches:
            os.pwrite(fd, data, pos)
        if offset != expected_size:
            raise AssertionError(f"wrote {offset} bytes, expected {expected_size}")
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)
    summary["seconds"] = time.perf_counter() - t0
    if not quiet:
        print(f"wrote {path}: {expected_size / GB:.3f} GB, {len(specs)} tensors in {summary['seconds']:.1f} s "
              f"({expected_size / GB / summary['seconds']:.2f} GB/s)", file=sys.stderr)
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path", help="output .safetensors file")
    ap.add_argument("--size-gb", type=float, default=1.0, help="target size in GB (1e9 bytes); default 1")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hidden", type=int, default=3072, help="hidden size H (3072 = FLUX); small for tests")
    ap.add_argument("--fresh", action="store_true", help="draw every chunk fresh instead of slicing a pool (i.i.d., ~10x slower)")
    ap.add_argument("--force", action="store_true", help="regenerate even if an identical file exists")
    args = ap.parse_args(argv)
    s = generate(args.path, args.size_gb, seed=args.seed, hidden=args.hidden, fresh=args.fresh, force=args.force,
                 quiet=False)
    if s["reused"]:
        print(f"reused {args.path} ({s['bytes'] / GB:.3f} GB, same parameters)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
