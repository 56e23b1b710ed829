"""quantkit's budget runtime beside diffusers' group offloading and accelerate's offload, one run, CPU.

One FLUX.1-dev-shaped transformer (diffusers ``FluxTransformer2DModel``, hidden 3072, ``--blocks``
double,single), random BF16 weights (model_output.py's generator) and its FP8 conversion
(``quantkit convert --format native``). Each row is a fresh process that builds the model, runs one
warm-up forward and ``--forwards`` timed ones in ``--compute-dtype`` on the same seeded inputs:

- ``quantkit budget``: the FP8 file, ``mode="budget"`` at the smallest budget that works (``--budget``
  to set one); blocks read from the file as they run, the next one read ahead (two in flight).
- ``quantkit budget, no prefetch`` (``quantkit-budget-1``): the same with ``prefetch=False``: one block
  in flight, so the smallest budget is one block smaller.
- ``diffusers group offload (disk)``: the BF16 model, ``apply_group_offloading(onload_device="cpu",
  offload_type="block_level", num_blocks_per_group=1, offload_to_disk_path=...)``: each group's
  weights written to disk once and read back (as BF16) as it runs: the one CPU configuration of group
  offloading that holds less than the whole model.
- ``diffusers group offload (cpu)``: the same without the disk: onload and offload device are both
  the CPU, so every weight stays in memory (degenerate on CPU: what it shows is the hooks' cost).
- ``accelerate disk_offload``: the BF16 model's weights in accelerate's offload folder (numpy memory
  maps), each module's loaded as it runs (``execution_device="cpu"``).
- ``accelerate cpu_offload``: degenerate on CPU like group offloading's cpu row.

``--machine-memory 1.6GB`` runs each row's process, from its first byte, in a memory cgroup of that
size (anonymous memory and page cache together: a machine that small; needs root): the parent
evicts the row's files from the page cache first, so every page the row uses is charged to it. Where
the FP8 file fits beside the process and the BF16 offload folder does not, this is where the two
differ: the BF16 rows read their weights from the disk on every forward. Each row also reports the
bytes read from the disk per timed forward (``/proc/self/io`` ``read_bytes``; every row's weight
files are evicted before its warm-up forward).

Per row: peak RSS during the forwards only (``/proc/self/clear_refs`` resets the high-water mark
after setup: loading a BF16 model with ``from_pretrained`` first holds all of it, which is the
library's loading, not its offloading), RSS before the forwards, seconds per forward. What a CPU-only
run cannot show: the point of both libraries on a GPU, copies to the device overlapped with compute
on CUDA streams, and pinned-memory transfers; here "onload" is a no-op or a read from disk. Not run
in CI; needs ``pip install accelerate`` (the ``bench`` extra).

    python benchmarks/offload_compare.py --out-dir /tmp/qkoff --blocks 1,2 --json /tmp/qkoff/results.json
    python benchmarks/offload_compare.py --out-dir /tmp/qkoff --blocks 1,2 --machine-memory 1.6GB \
        --rows quantkit-budget,diffusers-group-disk,accelerate-disk
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
import runtime_budget  # noqa: E402

ROWS = ["quantkit-budget", "quantkit-budget-1", "diffusers-group-disk", "diffusers-group-cpu", "accelerate-disk",
        "accelerate-cpu"]


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")             # resets VmHWM to the current RSS


def _build(args, config: dict, dtype):
    """The model as the row runs it."""
    import diffusers
    import torch
    if args.row.startswith("quantkit-budget"):
        import quantkit.runtime as qr
        depth = 1 if args.row == "quantkit-budget-1" else 2       # blocks in flight: 1 without prefetching
        budget = int(args.budget) if args.budget else None
        if budget is None:
            plan = runtime_budget._plan(args.fp8, config, args.compute_dtype)
            budget = plan.fixed + plan.work + sum(sorted(plan.units.values(), reverse=True)[:depth])
        return qr.load(runtime_budget._empty(config), args.fp8, mode="budget", max_memory=budget,
                       compute_dtype=dtype, prefetch=depth == 2), {"max_memory": budget}
    model = diffusers.FluxTransformer2DModel.from_pretrained(args.src, torch_dtype=dtype).eval()
    folder = os.path.join(args.out_dir, f"offload-{args.row}")
    shutil.rmtree(folder, ignore_errors=True)
    if args.row.startswith("diffusers-group"):
        from diffusers.hooks import apply_group_offloading
        disk = {"offload_to_disk_path": folder} if args.row.endswith("disk") else {}
        apply_group_offloading(model, onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                               offload_type="block_level", num_blocks_per_group=1, **disk)
    elif args.row == "accelerate-disk":
        from accelerate import disk_offload
        disk_offload(model, folder, execution_device=torch.device("cpu"))
    else:
        from accelerate import cpu_offload
        cpu_offload(model, execution_device=torch.device("cpu"))
    import gc

    from quantkit.runtime.streaming import return_freed_memory
    gc.collect()
    return_freed_memory()           # what loading freed goes back to the system before the baseline
    return model, {}


def _cgroup_dir(limit: int, row: str) -> str:
    """A memory cgroup (v1 or v2) under this process's own, limited to ``limit`` bytes of memory:
    anonymous memory and page cache together, as a machine of that size has. Needs the right to
    create one (root in a container or VM); refused with what to do otherwise."""
    with open("/proc/self/cgroup") as f:
        lines = [line.rstrip("\n").split(":", 2) for line in f]
    v1 = [path for _, ctrl, path in lines if "memory" in ctrl.split(",")]
    if v1 and os.path.isdir("/sys/fs/cgroup/memory"):
        base, limit_file = "/sys/fs/cgroup/memory" + v1[0], "memory.limit_in_bytes"
    else:
        base, limit_file = "/sys/fs/cgroup" + next(path for h, _, path in lines if h == "0"), "memory.max"
    path = os.path.join(base, f"quantkit-bench-{os.getpid()}-{row}")
    try:
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, limit_file), "w") as f:
            f.write(str(limit))
    except OSError as e:
        sys.exit(f"--machine-memory: cannot make a memory cgroup under {base} ({e}); run as root, "
                 "or leave the option out")
    return path


def _cgroup_peak(path: str) -> dict:
    """The cgroup's peak memory (anonymous + page cache) and how often it hit its limit."""
    out = {}
    for key, name in (("cgroup_peak_bytes", "memory.max_usage_in_bytes"), ("cgroup_peak_bytes", "memory.peak"),
                      ("cgroup_limit_hits", "memory.failcnt")):
        try:
            with open(os.path.join(path, name)) as f:
                out[key] = int(f.read().split()[0])
        except (OSError, ValueError):
            pass
    return out


def _weight_files(args) -> list[str]:
    """The files a row reads its weights from during the forwards."""
    if args.row.startswith("quantkit-budget"):
        return [args.fp8]
    folder = os.path.join(args.out_dir, f"offload-{args.row}")
    return [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs]


def child(args) -> int:
    if args.cgroup:                     # first of all: everything this process holds is charged there
        with open(os.path.join(args.cgroup, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    import torch
    with open(args.config) as f:
        config = json.load(f)
    dtype = getattr(torch, runtime_budget.DTYPES[args.compute_dtype])
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, extra = _build(args, config, dtype)
    setup_s = time.perf_counter() - t0
    inputs = runtime_budget._inputs(config, args.tokens, args.text_tokens, dtype)
    for path in _weight_files(args):        # every row starts its forwards from the disk
        runtime_budget.drop_file_cache(path)
    with torch.no_grad():
        model(**inputs)
        before = runtime_budget._status()["VmRSS"]
        _reset_peak()
        times, disk = [], []
        for _ in range(args.forwards):
            io0, t0 = runtime_budget._io()["read_bytes"], time.perf_counter()
            out = model(**inputs)[0]
            times.append(time.perf_counter() - t0)
            disk.append(runtime_budget._io()["read_bytes"] - io0)
    result = {"row": args.row, "setup_s": setup_s, "s_per_forward": sum(times) / len(times), "forward_s": times,
              "disk_read_bytes_per_forward": sum(disk) / len(disk),
              "rss_before_forwards_bytes": before, "forward_peak_rss_bytes": runtime_budget._status()["VmHWM"],
              "output_checksum": float(out.double().sum()), **extra,
              **(_cgroup_peak(args.cgroup) if args.cgroup else {})}
    with open(args.result, "w") as f:
        json.dump(result, f)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--blocks", default="1,2")
    ap.add_argument("--compute-dtype", default="bf16", choices=sorted(runtime_budget.DTYPES))
    ap.add_argument("--forwards", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--text-tokens", type=int, default=8)
    ap.add_argument("--budget", default="", help="quantkit's max_memory in bytes (default: the smallest that works)")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--machine-memory", default="",
                    help="run each row's process in a memory cgroup of this size (\"2.5GB\"): anonymous memory and "
                         "the page cache together, a machine that small (needs root)")
    ap.add_argument("--json")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--row", help=argparse.SUPPRESS)
    ap.add_argument("--src", help=argparse.SUPPRESS)
    ap.add_argument("--fp8", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--cgroup", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)
    os.makedirs(args.out_dir, exist_ok=True)
    double, single = (int(x) for x in args.blocks.split(","))
    config = {**model_output.FLUX_DEV, "num_layers": double, "num_single_layers": single}
    src, fp8 = os.path.join(args.out_dir, "flux-src"), os.path.join(args.out_dir, "flux-fp8.safetensors")
    config_path = os.path.join(args.out_dir, "config.json")
    with open(config_path, "w") as f:
        json.dump(config, f)
    model_output.write_model(src, config)
    if not os.path.exists(fp8):
        m = harness.measure(harness.quantkit_cmd() + ["convert", src, fp8, "--format", "native", "--overwrite", "-q"],
                            os.path.join(args.out_dir, "convert.log"))
        if m["rc"] != 0:
            print(m["log_tail"], file=sys.stderr)
            return 1
    results = {"blocks": [double, single], "compute_dtype": args.compute_dtype, "tokens": args.tokens,
               "text_tokens": args.text_tokens, "bf16_bytes": os.path.getsize(os.path.join(
                   src, "diffusion_pytorch_model.safetensors")), "fp8_bytes": os.path.getsize(fp8),
               "command": sys.argv, "machine": harness.machine_info(args.out_dir), "rows": []}
    limit = None
    if args.machine_memory:
        from quantkit.runtime.budget import budget_bytes
        limit = results["machine_memory_bytes"] = budget_bytes(args.machine_memory)
    for row in args.rows.split(","):
        result = os.path.join(args.out_dir, f"row-{row}.json")
        cgroup = _cgroup_dir(limit, row) if limit else ""
        if limit:       # pages cached by an earlier process stay charged to it: the row faults in its own
            for path in [os.path.join(d, f) for d, _, fs in os.walk(src) for f in fs] + [fp8]:
                runtime_budget.drop_file_cache(path)
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--out-dir", args.out_dir, "--row", row,
               "--src", src, "--fp8", fp8, "--config", config_path, "--result", result, "--budget", args.budget,
               "--forwards", str(args.forwards), "--tokens", str(args.tokens), "--text-tokens", str(args.text_tokens),
               "--compute-dtype", args.compute_dtype, "--cgroup", cgroup]
        try:
            m = harness.measure(cmd, os.path.join(args.out_dir, f"row-{row}.log"))
        finally:
            if cgroup:
                os.rmdir(cgroup)
            if not args.keep:      # a full-size BF16 offload folder is 24 GB: one row's at a time on the disk
                shutil.rmtree(os.path.join(args.out_dir, f"offload-{row}"), ignore_errors=True)
        if m["rc"] != 0:
            print(f"{row}: exit {m['rc']}\n{m['log_tail']}", file=sys.stderr)
            results["rows"].append({"row": row, "failed_rc": m["rc"], "log_tail": m["log_tail"]})
            continue
        r = {**harness.read_json(result), "process_peak_rss_bytes": m["peak_rss_bytes"], "wall_s": m["wall_s"],
             "cpu_pressure": m["cpu_pressure"]}
        results["rows"].append(r)
        print(json.dumps(r), file=sys.stderr)
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if not args.keep:
        shutil.rmtree(src, ignore_errors=True)
        for row in ROWS:
            shutil.rmtree(os.path.join(args.out_dir, f"offload-{row}"), ignore_errors=True)
    return 0


def table(results: dict) -> str:
    lines = ["| row | weights read from | peak RSS during forwards | RSS before them | s / forward | "
             "read from disk / forward | process peak RSS (setup included) |", "|---|---|---:|---:|---:|---:|---:|"]
    source = {"quantkit-budget": "FP8 file", "quantkit-budget-1": "FP8 file (no prefetch)",
              "diffusers-group-disk": "BF16 offload folder (safetensors)", "diffusers-group-cpu": "memory (BF16)", "accelerate-disk": "BF16 offload folder (memmap)",
              "accelerate-cpu": "memory (BF16)"}
    for r in results["rows"]:
        if "failed_rc" in r:
            lines.append(f"| {r['row']} | exit {r['failed_rc']} | | | | | |")
            continue
        lines.append(f"| {r['row']} | {source[r['row']]} | {r['forward_peak_rss_bytes'] / 1e9:.3f} GB | "
                     f"{r['rss_before_forwards_bytes'] / 1e9:.3f} GB | {r['s_per_forward']:.2f} | "
                     f"{r['disk_read_bytes_per_forward'] / 1e9:.3f} GB | {r['process_peak_rss_bytes'] / 1e9:.3f} GB |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
