"""Validate a FLUX.1-dev-sized transformer at its output on a small machine.

A diffusers FluxTransformer2DModel with FLUX.1-dev's configuration (19 double blocks, 38 single
blocks, hidden 3072: 23.8 GB in BF16) is written as a model folder (config.json +
diffusion_pytorch_model.safetensors) with random BF16 weights (benchmarks/make_checkpoint.py's
generator: N(0, 0.02) plus outliers, streamed, ~200 MB of memory), converted with
``quantkit convert --format native``, then validated at the model's output:

    quantkit validate OUT --against SRC --model-output --min-output-sqnr 20

Each command runs in a fresh process measured by benchmarks/run.py's shim (wall time, CPU time,
peak RSS of that process alone). The validation builds the model without memory and runs the
source and the FP8 output through ``quantkit.runtime`` in streamed mode, one block at a time,
one model after the other.

    python benchmarks/model_output.py --out-dir /tmp/qkmo                      # full size: ~36 GB of disk
    python benchmarks/model_output.py --out-dir /tmp/qkmo --blocks 2,4         # the same shapes, 6 blocks
    python benchmarks/model_output.py --out-dir /tmp/qkmo --blocks 2,4 --calibrate   # + calibrate, convert --stats, W8A8 rows
    python benchmarks/model_output.py --out-dir /tmp/qkmo --blocks 1,2 --heldout     # + validate --heldout (24 seeded inputs)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_checkpoint  # noqa: E402
import run as harness  # noqa: E402

GB = 1e9
# FLUX.1-dev's transformer/config.json (the fields FluxTransformer2DModel takes).
FLUX_DEV = {"_class_name": "FluxTransformer2DModel", "attention_head_dim": 128, "guidance_embeds": True,
            "in_channels": 64, "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19,
            "num_single_layers": 38, "patch_size": 1, "pooled_projection_dim": 768, "axes_dims_rope": [16, 56, 56]}


def flux_specs(config: dict) -> list[make_checkpoint.Spec]:
    """Every tensor of the real diffusers model for ``config`` (built on the meta device), in order."""
    import torch
    from diffusers import FluxTransformer2DModel
    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    specs = []
    for name, t in model.state_dict().items():
        kind = "bias" if name.endswith(".bias") else "weight" if t.dim() >= 2 else "norm"
        specs.append(make_checkpoint.Spec(name, tuple(t.shape), kind))
    return specs


def write_model(folder: str, config: dict, seed: int = 0) -> dict:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    metadata = {"format": "pt", "generator": "quantkit-benchmarks/model_output.py",
                "generator.version": make_checkpoint.GENERATOR_VERSION, "generator.seed": str(seed),
                "generator.config": json.dumps(config, sort_keys=True)}
    return make_checkpoint.write_specs(os.path.join(folder, "diffusion_pytorch_model.safetensors"),
                                       flux_specs(config), metadata, seed=seed, quiet=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--blocks", default="19,38", help="double,single blocks (FLUX.1-dev: 19,38)")
    ap.add_argument("--compute-dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints (default: delete them at the end)")
    ap.add_argument("--calibrate", action="store_true",
                    help="issue 10's pipeline: quantkit calibrate (weights + activations, streamed), convert --stats, "
                         "validate --model-output --activations all")
    ap.add_argument("--calibrate-only", action="store_true", help="with --calibrate: stop after calibrate")
    ap.add_argument("--steps", type=int, default=4, help="--calibrate: timesteps per seed")
    ap.add_argument("--seeds", type=int, default=2, help="--calibrate: seeds")
    ap.add_argument("--heldout", action="store_true",
                    help="validate --heldout: per-input cosine / SQNR (mean, p5, p1, min, spread) on 24 seeded "
                         "inputs calibration never uses")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    double, single = (int(x) for x in args.blocks.split(","))
    config = {**FLUX_DEV, "num_layers": double, "num_single_layers": single}
    src, out = os.path.join(args.out_dir, "flux-src"), os.path.join(args.out_dir, "flux-fp8.safetensors")
    results = {"blocks": [double, single], "machine": harness.machine_info(args.out_dir), "load_before": harness.loadavg()}
    t0 = time.perf_counter()
    made = write_model(src, config)
    results["source_bytes"], results["generate_s"] = made["bytes"], time.perf_counter() - t0
    qk = harness.quantkit_cmd()
    stats = os.path.join(args.out_dir, "flux.stats.safetensors")
    calibrate = [("calibrate", qk + ["calibrate", src, "-o", stats, "--steps", str(args.steps), "--seeds",
                                     str(args.seeds), "--compute-dtype", args.compute_dtype, "--overwrite", "-q",
                                     "--json", os.path.join(args.out_dir, "calibrate.json")])] if args.calibrate else []
    steps = [*calibrate,
             ("convert", qk + ["convert", src, out, "--format", "native", "--overwrite", "-q",
                               "--json", os.path.join(args.out_dir, "convert.json")]
              + (["--stats", stats] if args.calibrate else [])),
             ("validate --model-output", qk + ["validate", out, "--against", src, "--model-output",
                                               "--compute-dtype", args.compute_dtype, "--min-output-sqnr", "20",
                                               "-q", "--overwrite", "--json", os.path.join(args.out_dir, "validate.json")]
              + (["--activations", "all"] if args.calibrate else [])
              + (["--heldout"] if args.heldout else []))]
    if args.calibrate and args.calibrate_only:
        steps = steps[:1]
    for name, cmd in steps:
        harness.settle()
        m = harness.measure(cmd, os.path.join(args.out_dir, name.split()[0] + ".log"))
        results[name] = {k: m[k] for k in ("rc", "wall_s", "cpu_s", "peak_rss_bytes", "cpu_pressure")}
        print(f"{name}: exit {m['rc']}, {m['wall_s']:.1f} s wall, {m['cpu_s']:.1f} s CPU, "
              f"peak RSS {m['peak_rss_bytes'] / 1e9:.2f} GB", file=sys.stderr)
        if m["rc"] not in (0, 1):
            print(m["log_tail"], file=sys.stderr)
    report = harness.read_json(os.path.join(args.out_dir, "validate.json")) or {}
    results["model_output"] = report.get("model_output")
    results["output_bytes"] = os.path.getsize(out) if os.path.exists(out) else None
    results["load_after"] = harness.loadavg()
    mo = results["model_output"] or {}
    print(f"source {results['source_bytes'] / GB:.2f} GB -> output {(results['output_bytes'] or 0) / GB:.2f} GB; "
          f"model output SQNR {mo.get('sqnr')}, cosine {mo.get('cosine')}, weights peak {mo.get('weights_peak_bytes')}",
          file=sys.stderr)
    if mo.get("heldout"):
        h = mo["heldout"]
        print(f"held-out ({h['inputs']}): cosine mean {h['cosine']['mean']:.6f}, p5 {h['cosine']['p5']:.6f}, "
              f"min {h['cosine']['min']:.6f}; SQNR mean {h['sqnr']['mean']:.2f}, p5 {h['sqnr']['p5']:.2f}, "
              f"min {h['sqnr']['min']:.2f} dB (spread over {h['spread_over']}: min cosine "
              f"{h['spread']['cosine']['min'][0]:.6f}-{h['spread']['cosine']['min'][1]:.6f})", file=sys.stderr)
    if args.calibrate:
        results["calibrate_report"] = harness.read_json(os.path.join(args.out_dir, "calibrate.json"))
        for row in (mo.get("rows") or []):
            print(f"  {row['row']:12} SQNR {row['sqnr']:.2f} dB, cosine {row['cosine']:.5f}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if not args.keep:
        shutil.rmtree(src, ignore_errors=True)
        for p in (out, out.replace(".safetensors", ".quantkit.json"), stats):
            if os.path.exists(p):
                os.unlink(p)
    return 0 if all(results[n]["rc"] == 0 for n, _ in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
