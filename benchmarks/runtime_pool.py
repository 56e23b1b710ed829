"""Two models in one ``quantkit.runtime.Pool``: a FLUX.1-dev-shaped transformer and a ControlNet beside it.

Both are diffusers models with FLUX.1-dev's shapes (hidden 3072, 24 heads): a
``FluxTransformer2DModel`` with ``--blocks double,single`` and a ``FluxControlNetModel`` with
``--controlnet-blocks`` double blocks (FLUX.1 ControlNet Union has 5 and no single blocks), random
BF16 weights (make_checkpoint.py's generator), converted with ``quantkit convert --format native``.
A denoising step is what a ControlNet pipeline runs: the ControlNet, then the transformer given the
ControlNet's block samples; ``--steps`` steps in turn, the same inputs each step.

Each row runs in a fresh process: ``alone`` (each model loaded by itself, resident: the reference
outputs), then the two models in one pool at ``max_memory`` = both models' tensors outside their
blocks + the pool's reserve (the largest model's two largest blocks and dequantization's work) +
``--room`` of both models' blocks, with ``eviction="lru"`` and ``eviction="stable"``. Per row:
peak RSS (and the baseline before loading, diffusers imported), the bytes each step reads from the
files (the runtime's own count of the blocks it reads), seconds per step, the pool's own peak count,
and whether every step's output equals the models run alone, bit for bit. Not run in CI.

    python benchmarks/runtime_pool.py --out-dir /tmp/qkpool --blocks 1,2 --controlnet-blocks 1
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_checkpoint  # noqa: E402
import model_output  # noqa: E402
import run as harness  # noqa: E402
import runtime_budget  # noqa: E402


def _module(kind: str, config: dict, empty: bool = True):
    import diffusers
    import torch

    import quantkit.runtime as qr
    cls = diffusers.FluxControlNetModel if kind == "controlnet" else diffusers.FluxTransformer2DModel
    clean = {k: v for k, v in config.items() if not k.startswith("_")}
    if not empty:
        with torch.device("meta"):
            return cls.from_config(clean)
    with qr.empty_weights():
        return cls.from_config(clean).eval()


def write_checkpoints(out_dir: str, blocks: tuple[int, int], controlnet_blocks: int) -> dict:
    """{kind: (FP8 file, config)} for the transformer and the ControlNet, written and converted once."""
    made = {}
    configs = {"transformer": {**model_output.FLUX_DEV, "num_layers": blocks[0], "num_single_layers": blocks[1]},
               "controlnet": {**model_output.FLUX_DEV, "_class_name": "FluxControlNetModel",
                              "num_layers": controlnet_blocks, "num_single_layers": 0}}
    for kind, config in configs.items():
        src, out = os.path.join(out_dir, f"{kind}-src"), os.path.join(out_dir, f"{kind}-fp8.safetensors")
        if not os.path.exists(out):
            os.makedirs(src, exist_ok=True)
            with open(os.path.join(src, "config.json"), "w") as f:
                json.dump(config, f)
            specs = [make_checkpoint.Spec(n, tuple(t.shape), "bias" if n.endswith(".bias") else
                                          "weight" if t.dim() >= 2 else "norm")
                     for n, t in _module(kind, config, empty=False).state_dict().items()]
            make_checkpoint.write_specs(os.path.join(src, "diffusion_pytorch_model.safetensors"), specs,
                                        {"format": "pt"}, seed=1 if kind == "controlnet" else 0)
            m = harness.measure(harness.quantkit_cmd() + ["convert", src, out, "--format", "native", "--overwrite",
                                                          "-q"], os.path.join(out_dir, f"convert-{kind}.log"))
            if m["rc"] != 0:
                raise RuntimeError(m["log_tail"])
        made[kind] = (out, config)
    return made


def _inputs(config: dict, tokens: int, text: int):
    import torch
    x = runtime_budget._inputs(config, tokens, text, torch.float32)
    g = torch.Generator().manual_seed(1)
    return x, {**{k: x[k] for k in ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep",
                                    "guidance", "img_ids", "txt_ids")},
               "controlnet_cond": torch.randn(x["hidden_states"].shape, generator=g), "return_dict": False}


def _step(transformer, controlnet, x, c):
    double, single = controlnet(**c)
    return transformer(**x, controlnet_block_samples=double, controlnet_single_block_samples=single)[0]


def child(args) -> int:
    import torch

    import quantkit.runtime as qr
    with open(args.files) as f:
        made = json.load(f)
    read = runtime_budget.counting_reads()
    empties = {k: _module(k, made[k][1]) for k in made}
    baseline = runtime_budget._status()
    pool = None
    if args.mode == "alone":
        models = {k: qr.load(empties[k], made[k][0], compute_dtype=torch.float32) for k in made}
    else:
        probe = qr.Pool(max_memory=10**15)
        loaded = [probe.load(_module(k, made[k][1]), made[k][0], compute_dtype=torch.float32) for k in made]
        blocks = sum(sum(m.quantkit_runtime._streamer.bytes.values()) for m in loaded)
        fixed, reserve = probe.cache.fixed, probe.cache.reserve
        for m in loaded:
            probe.remove(m)
        budget = fixed + reserve + int(blocks * args.room)
        pool = qr.Pool(max_memory=budget, eviction=args.mode)
        models = {k: pool.load(empties[k], made[k][0], compute_dtype=torch.float32) for k in made}
    x, c = _inputs(made["transformer"][1], args.tokens, args.text_tokens)
    steps, reads, outs = [], [], []
    with torch.no_grad():
        for _ in range(args.steps):
            read["bytes"] = 0
            t0 = time.perf_counter()
            outs.append(_step(models["transformer"], models["controlnet"], x, c))
            steps.append(time.perf_counter() - t0)
            reads.append(read["bytes"])
    torch.save(torch.stack(outs), args.result + ".pt")
    result = {"mode": args.mode, "baseline_rss_bytes": baseline["VmRSS"], "s_per_step": steps,
              "read_bytes_per_step": reads, "vmhwm_bytes": runtime_budget._status()["VmHWM"],
              "file_bytes": {k: os.path.getsize(made[k][0]) for k in made}}
    if pool is not None:
        result.update({"max_memory": pool.max_memory, "pool_peak_bytes": pool.peak_bytes,
                       "reserve_bytes": pool.cache.reserve,
                       "blocks_bytes": blocks, "room": args.room, "evicted": len(pool.evicted),
                       "summary": pool.summary()})
    with open(args.result, "w") as f:
        json.dump(result, f)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--blocks", default="1,2", help="the transformer's double,single blocks (FLUX.1-dev: 19,38)")
    ap.add_argument("--controlnet-blocks", type=int, default=1, help="the ControlNet's double blocks (Union: 5)")
    ap.add_argument("--room", type=float, default=0.75, help="the share of both models' blocks the pool keeps")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--text-tokens", type=int, default=8)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--files", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)
    os.makedirs(args.out_dir, exist_ok=True)
    blocks = tuple(int(b) for b in args.blocks.split(","))
    made = write_checkpoints(args.out_dir, blocks, args.controlnet_blocks)
    files = os.path.join(args.out_dir, "files.json")
    with open(files, "w") as f:
        json.dump(made, f)
    for path, _ in made.values():
        harness.warm_page_cache(path)
    results = {"blocks": list(blocks), "controlnet_blocks": args.controlnet_blocks, "room": args.room,
               "tokens": args.tokens, "text_tokens": args.text_tokens, "command": sys.argv,
               "machine": harness.machine_info(args.out_dir), "rows": []}
    reference = None
    for mode in ("alone", "lru", "stable"):
        result = os.path.join(args.out_dir, f"row-{mode}.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--out-dir", args.out_dir, "--mode", mode,
               "--files", files, "--result", result, "--steps", str(args.steps), "--room", str(args.room),
               "--tokens", str(args.tokens), "--text-tokens", str(args.text_tokens)]
        m = harness.measure(cmd, os.path.join(args.out_dir, f"row-{mode}.log"))
        if m["rc"] != 0:
            print(m["log_tail"], file=sys.stderr)
            return 1
        row = {**harness.read_json(result), "peak_rss_bytes": m["peak_rss_bytes"], "wall_s": m["wall_s"]}
        row["same_output_as_alone"] = runtime_budget._same(reference, result + ".pt")
        reference = reference or result + ".pt"
        results["rows"].append(row)
        print(json.dumps({k: row[k] for k in row if k not in ("summary",)}), file=sys.stderr)
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if not args.keep:
        import shutil
        for kind in made:
            shutil.rmtree(os.path.join(args.out_dir, f"{kind}-src"), ignore_errors=True)
    return 0


def table(results: dict) -> str:
    lines = ["| run | max_memory | pool's peak count | peak RSS | baseline RSS | read per step (GB) | "
             "s per step | same as alone |", "|---|---:|---:|---:|---:|---|---|---|"]
    for r in results["rows"]:
        budget = f"{r['max_memory'] / 1e9:.3f} GB" if "max_memory" in r else "-"
        held = f"{r['pool_peak_bytes'] / 1e9:.3f} GB" if "max_memory" in r else "-"
        lines.append(f"| {r['mode']} | {budget} | {held} | {r['peak_rss_bytes'] / 1e9:.3f} GB | "
                     f"{r['baseline_rss_bytes'] / 1e9:.3f} GB | "
                     f"{', '.join(f'{b / 1e9:.3f}' for b in r['read_bytes_per_step'])} | "
                     f"{', '.join(f'{s:.1f}' for s in r['s_per_step'])} | {r['same_output_as_alone']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
