"""quantkit.runtime's budget mode on a FLUX.1-dev-shaped transformer: memory, time and reads per budget.

A diffusers FluxTransformer2DModel with FLUX.1-dev's shapes (hidden 3072, 24 heads) and a few
blocks (``--blocks double,single``) is written with random BF16 weights (model_output.py's
generator), converted with ``quantkit convert --format native`` (FP8 E4M3, per-tensor scales),
then run in a fresh process per row: ``mode="resident"``, ``mode="streamed"``, and
``mode="budget"`` at budgets from the smallest that works (the two largest blocks in flight,
the tensors outside the blocks and dequantization's work) to everything. Per row: peak RSS of
the process (torch and diffusers imports included: the ``baseline`` column is the RSS before
loading), seconds per forward (the mean of ``--forwards`` after one warm-up forward), the bytes
the runtime reads from the file per forward (its own count of the streamed blocks' tensors; the
file sits in the page cache, so these are reads from memory, not disk; two warm-up forwards first,
so the prefetch knows which block starts a call) and the runtime's own count of what it held at most
plus dequantization's reserved work (``held``). Not run in CI.

    python benchmarks/runtime_budget.py --out-dir /tmp/qkrb --blocks 1,2
    python benchmarks/runtime_budget.py --out-dir /tmp/qkrb --blocks 19,38 --steps 6   # full size: ~36 GB of disk
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import model_output  # noqa: E402
import run as harness  # noqa: E402

DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _empty(config: dict):
    import diffusers

    import quantkit.runtime as qr
    with qr.empty_weights():
        return diffusers.FluxTransformer2DModel.from_config(
            {k: v for k, v in config.items() if not k.startswith("_")}).eval()


def _inputs(config: dict, tokens: int, text: int, dtype):
    import torch
    g = torch.Generator().manual_seed(0)
    return {"hidden_states": torch.randn(1, tokens, config["in_channels"], generator=g, dtype=dtype),
            "encoder_hidden_states": torch.randn(1, text, config["joint_attention_dim"], generator=g, dtype=dtype),
            "pooled_projections": torch.randn(1, config["pooled_projection_dim"], generator=g, dtype=dtype),
            "timestep": torch.tensor([0.5], dtype=dtype), "guidance": torch.tensor([3.5], dtype=dtype),
            "img_ids": torch.zeros(tokens, 3), "txt_ids": torch.zeros(text, 3), "return_dict": False}


def child(args) -> int:
    """One row: load, one warm-up forward, ``--forwards`` timed ones; the result as JSON."""
    import torch

    import quantkit.runtime as qr
    from quantkit.runtime.streaming import Streamer
    with open(os.path.join(args.out_dir, "config.json")) as f:
        config = json.load(f)
    dtype = getattr(torch, DTYPES[args.compute_dtype])
    read = {"bytes": 0}
    original = Streamer.read

    def counted(self, unit):
        read["bytes"] += self.bytes[unit]
        return original(self, unit)
    Streamer.read = counted
    torch.manual_seed(0)
    baseline = _rss()
    options = {"max_memory": int(args.budget)} if args.mode == "budget" else {}
    t0 = time.perf_counter()
    model = qr.load(_empty(config), args.file, mode=args.mode, compute_dtype=dtype, **options)
    load_s = time.perf_counter() - t0
    inputs = _inputs(config, args.tokens, args.text_tokens, dtype)
    with torch.no_grad():
        first = model(**inputs)[0]
        model(**inputs)        # a second warm-up: the prefetch has seen one call end and the next begin
        read["bytes"], times = 0, []
        for _ in range(args.forwards):
            t0 = time.perf_counter()
            out = model(**inputs)[0]
            times.append(time.perf_counter() - t0)
    info = model.quantkit_runtime
    plan = info.plan
    result = {"mode": args.mode, "budget": int(args.budget) if args.mode == "budget" else None,
              "baseline_rss_bytes": baseline, "load_s": load_s, "s_per_forward": sum(times) / len(times),
              "read_bytes_per_forward": read["bytes"] / args.forwards,
              "held_peak_bytes": info.peak_bytes + (plan.work if plan else 0),
              "resident_units": len(plan.resident) if plan else None, "units": len(plan.units) if plan else None,
              "residency": info.residency, "same_output": bool(torch.equal(first, out)),
              "output_checksum": float(out.double().sum()),
              "self_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    with open(args.result, "w") as f:
        json.dump(result, f)
    return 0


def _plan(file: str, config: dict, dtype: str):
    """Budget mode's plan at a budget that holds everything (units, fixed bytes, work)."""
    import torch

    import quantkit.runtime as qr
    model = qr.load(_empty(config), file, mode="budget", max_memory=10**15, compute_dtype=getattr(torch, DTYPES[dtype]))
    return model.quantkit_runtime.plan


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--blocks", default="1,2", help="double,single blocks (FLUX.1-dev: 19,38)")
    ap.add_argument("--compute-dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--steps", type=int, default=4, help="budgets between the smallest and everything, ends included")
    ap.add_argument("--forwards", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64, help="image tokens (a 256x256 image is 256)")
    ap.add_argument("--text-tokens", type=int, default=16)
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--file", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--budget", default="0", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)
    double, single = (int(x) for x in args.blocks.split(","))
    config = {**model_output.FLUX_DEV, "num_layers": double, "num_single_layers": single}
    os.makedirs(args.out_dir, exist_ok=True)
    src, out = os.path.join(args.out_dir, "flux-src"), os.path.join(args.out_dir, "flux-fp8.safetensors")
    with open(os.path.join(args.out_dir, "config.json"), "w") as f:
        json.dump(config, f)
    if not os.path.exists(out):
        model_output.write_model(src, config)
        m = harness.measure(harness.quantkit_cmd() + ["convert", src, out, "--format", "native", "--overwrite", "-q"],
                            os.path.join(args.out_dir, "convert.log"))
        if m["rc"] != 0:
            print(m["log_tail"], file=sys.stderr)
            return 1
    plan = _plan(out, config, args.compute_dtype)
    smallest = plan.fixed + plan.work + sum(sorted(plan.units.values(), reverse=True)[:2])
    budgets = [smallest + (plan.peak - smallest) * i // args.steps for i in range(args.steps + 1)]
    rows = [("resident", 0), ("streamed", 0), *(("budget", b) for b in budgets)]
    results = {"blocks": [double, single], "file_bytes": os.path.getsize(out), "compute_dtype": args.compute_dtype,
               "tokens": args.tokens, "text_tokens": args.text_tokens, "machine": harness.machine_info(args.out_dir),
               "rows": []}
    harness.warm_page_cache(out)
    for mode, budget in rows:
        result = os.path.join(args.out_dir, "row.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--out-dir", args.out_dir, "--file", out,
               "--mode", mode, "--budget", str(budget), "--result", result, "--forwards", str(args.forwards),
               "--tokens", str(args.tokens), "--text-tokens", str(args.text_tokens),
               "--compute-dtype", args.compute_dtype]
        harness.settle()
        m = harness.measure(cmd, os.path.join(args.out_dir, "row.log"))
        if m["rc"] != 0:
            print(m["log_tail"], file=sys.stderr)
            return 1
        row = {**harness.read_json(result), "peak_rss_bytes": m["peak_rss_bytes"], "wall_s": m["wall_s"]}
        results["rows"].append(row)
        print(_line(row), file=sys.stderr)
    checksums = {r["output_checksum"] for r in results["rows"]}
    results["all_outputs_equal"] = len(checksums) == 1 and all(r["same_output"] for r in results["rows"])
    print(f"file {results['file_bytes'] / 1e9:.3f} GB; every row's output the same: {results['all_outputs_equal']}",
          file=sys.stderr)
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if not args.keep:
        shutil.rmtree(src, ignore_errors=True)
        for p in (out, out.replace(".safetensors", ".quantkit.json")):
            if os.path.exists(p):
                os.unlink(p)
    return 0


def _line(r: dict) -> str:
    return (f"{r['mode']:9} budget {(r['budget'] or 0) / 1e9:6.3f} GB: peak RSS {r['peak_rss_bytes'] / 1e9:.3f} GB, "
            f"{r['s_per_forward']:.2f} s/forward, read {r['read_bytes_per_forward'] / 1e9:.3f} GB/forward")


def table(results: dict) -> str:
    lines = ["| mode | max_memory | resident blocks | held (runtime's count) | peak RSS | baseline RSS | s / forward | "
             "read / forward |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["rows"]:
        budget = f"{r['budget'] / 1e9:.3f} GB" if r["budget"] else "-"
        units = f"{r['resident_units']} of {r['units']}" if r["units"] is not None else "-"
        lines.append(f"| {r['mode']} | {budget} | {units} | {r['held_peak_bytes'] / 1e9:.3f} GB | "
                     f"{r['peak_rss_bytes'] / 1e9:.3f} GB | {r['baseline_rss_bytes'] / 1e9:.3f} GB | "
                     f"{r['s_per_forward']:.2f} | {r['read_bytes_per_forward'] / 1e9:.3f} GB |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
