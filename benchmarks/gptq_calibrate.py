"""Peak memory and time of ``quantkit calibrate --rounding gptq`` on a FLUX.1-dev-shaped transformer.

The model folder is benchmarks/model_output.py's (FLUX.1-dev's config, hidden 3072, random BF16
weights from make_checkpoint.py's generator), with ``--blocks`` double,single blocks (FLUX.1-dev:
19,38, 23.8 GB). ``calibrate --rounding gptq`` runs in a fresh process measured by
benchmarks/run.py's shim (wall, CPU, peak RSS of that process). With the default inputs (8 rows,
one streamed pass) every Hessian is written to the sidecar as soon as its layer has run, so memory
holds the streamed block, its activations and one Hessian (the widest: the single blocks'
proj_out input, 15360 wide, 0.94 GB in float32): flat in the number of blocks. The sidecar grows
with the blocks (packed upper triangles, float32).

    python benchmarks/gptq_calibrate.py --out-dir /tmp/qkgc --blocks 2,4 --json benchmarks/results-gptq-calibrate.json
    flock /work/wt/bigjob.lock python benchmarks/gptq_calibrate.py --out-dir /tmp/qkgc --blocks 6,12   # 17 GB of disk
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import model_output  # noqa: E402
import run as harness  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--blocks", default="2,4", help="double,single blocks (FLUX.1-dev: 19,38)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint, stats and sidecar")
    ap.add_argument("--json", help="append the results to this JSON list")
    args = ap.parse_args(argv)
    double, single = (int(x) for x in args.blocks.split(","))
    config = {**model_output.FLUX_DEV, "num_layers": double, "num_single_layers": single}
    src = os.path.join(args.out_dir, "flux-src")
    stats = os.path.join(args.out_dir, "flux.stats.safetensors")
    report = os.path.join(args.out_dir, "calibrate.json")
    results = {"blocks": [double, single], "machine": harness.machine_info(args.out_dir),
               "load_before": harness.loadavg()}
    t0 = time.perf_counter()
    made = model_output.write_model(src, config)
    results["source_bytes"], results["generate_s"] = made["bytes"], time.perf_counter() - t0
    cmd = harness.quantkit_cmd() + ["calibrate", src, "-o", stats, "--rounding", "gptq", "--overwrite", "-q",
                                    "--json", report]
    harness.settle()
    m = harness.measure(cmd, os.path.join(args.out_dir, "calibrate.log"))
    results["calibrate"] = {k: m[k] for k in ("rc", "wall_s", "cpu_s", "peak_rss_bytes", "cpu_pressure")}
    results["load_after"] = harness.loadavg()
    doc = harness.read_json(report) or {}
    results["notes"] = doc.get("notes")
    sidecar = stats[:-len(".safetensors")] + ".hessians.safetensors"
    results["sidecar_bytes"] = os.path.getsize(sidecar) if os.path.exists(sidecar) else None
    print(f"calibrate --rounding gptq, {double}+{single} blocks ({results['source_bytes'] / 1e9:.2f} GB): exit "
          f"{m['rc']}, {m['wall_s']:.1f} s wall, {m['cpu_s']:.1f} s CPU, peak RSS {m['peak_rss_bytes'] / 1e9:.2f} GB, "
          f"sidecar {(results['sidecar_bytes'] or 0) / 1e9:.2f} GB", file=sys.stderr)
    if m["rc"] != 0:
        print(m["log_tail"], file=sys.stderr)
    if args.json:
        rows = harness.read_json(args.json) if os.path.exists(args.json) else []
        rows = rows if isinstance(rows, list) else []
        rows.append(results)
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    if not args.keep:
        shutil.rmtree(src, ignore_errors=True)
        for p in (stats, sidecar, report):
            if os.path.exists(p):
                os.unlink(p)
    return 0 if m["rc"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
