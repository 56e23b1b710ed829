"""quantkit.runtime's budget mode on a FLUX.1-dev-shaped transformer: memory, time and reads per budget.

A diffusers FluxTransformer2DModel with FLUX.1-dev's shapes (hidden 3072, 24 heads) and a few
blocks (``--blocks double,single``) is written with random BF16 weights (model_output.py's
generator), converted with ``quantkit convert --format native`` (FP8 E4M3, per-tensor scales),
then run in a fresh process per row: ``mode="resident"``, ``mode="streamed"``, and
``mode="budget"`` at budgets from the smallest that works (the two largest blocks in flight,
the tensors outside the blocks and dequantization's work) to everything (``--rows`` names rows
instead, e.g. ``resident,budget:4GB,budget:half``; ``--fp8``/``--config``: a file made before).
Per row: peak RSS of the process and the baseline before loading (Python, torch, diffusers
imported and the empty model built: diffusers imports its model classes lazily, ~0.18 GB), the RSS
parts at the peak and what the runtime held then (a 2 ms sampler of /proc/self/status), seconds
per forward (the mean of ``--forwards`` after ``--warmups`` untimed ones), the bytes the runtime
reads from the file per forward (its own count of the streamed blocks' tensors) and what
/proc/self/io saw: ``rchar`` (what the read calls returned) and ``read_bytes`` (what came from the
disk: with ``--drop-cache`` the file is evicted from the page cache before each timed forward, so
these are real disk reads; without it the file sits in the page cache), and the output, compared
bit for bit with the first row's. Not run in CI.

    python benchmarks/runtime_budget.py --out-dir /tmp/qkrb --blocks 1,2
    python benchmarks/runtime_budget.py --out-dir /tmp/qkfull --fp8 flux-fp8.safetensors --config config.json \
        --rows resident,budget:4GB,budget:half --warmups 0 --forwards 1 --drop-cache --tokens 16 --text-tokens 8
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import model_output  # noqa: E402
import run as harness  # noqa: E402

DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def counting_reads() -> dict:
    """``{"bytes": n}``: the bytes the runtime's streamer reads from now on (``Streamer.read`` counted)."""
    from quantkit.runtime.streaming import Streamer
    read, original = {"bytes": 0}, Streamer.read

    def counted(self, unit):
        read["bytes"] += self.bytes[unit]
        return original(self, unit)
    Streamer.read = counted
    return read


def _status() -> dict:
    """This process's resident memory now and at most, in bytes: VmRSS = RssAnon + RssFile + RssShmem."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(line.split()[1]) * 1024
    return out


def _io() -> dict:
    """/proc/self/io (every thread of the process): rchar = bytes the read calls returned (page cache
    included), read_bytes = bytes the process made the kernel fetch from the disk."""
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(": ") for line in f)}


def drop_file_cache(path: str) -> None:
    """Evict ``path``'s pages from the page cache (``POSIX_FADV_DONTNEED`` on a clean file: only this
    file, no root needed), so the next reads of it come from the disk and show in ``read_bytes``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class Sampler(threading.Thread):
    """/proc/self/status every ``period`` s: at the highest RSS seen, its parts (anonymous memory,
    mapped file pages) and what the runtime counted as held at that moment (``held()``)."""

    def __init__(self, held, period: float = 0.002):
        super().__init__(daemon=True)
        self.held, self.period, self.done = held, period, threading.Event()
        self.peak: dict = {"VmRSS": 0}

    def run(self) -> None:
        while not self.done.is_set():
            now = _status()
            if now["VmRSS"] > self.peak["VmRSS"]:
                self.peak = {**now, "held": self.held()}
            self.done.wait(self.period)

    def stop(self) -> dict:
        self.done.set()
        self.join()
        return self.peak


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
    """One row: load, ``--warmups`` forwards, ``--forwards`` timed ones; the result as JSON, the
    output tensor beside it (``.pt``) for the parent to compare bit for bit."""
    import torch

    import quantkit.runtime as qr
    with open(args.config) as f:
        config = json.load(f)
    dtype = getattr(torch, DTYPES[args.compute_dtype])
    read = counting_reads()
    torch.manual_seed(0)
    empty = _empty(config)         # diffusers' model classes import lazily: ~0.18 GB, before the baseline
    baseline = _status()
    loaded: list = []
    sampler = Sampler(lambda: sum(i.materialised_bytes + i.resident_bytes for i in loaded))
    sampler.start()
    options = {"max_memory": int(args.budget)} if args.mode == "budget" else {}
    t0 = time.perf_counter()
    model = qr.load(empty, args.file, mode=args.mode, compute_dtype=dtype, **options)
    load_s = time.perf_counter() - t0
    info = model.quantkit_runtime
    loaded.append(info)
    after_load = _status()
    inputs = _inputs(config, args.tokens, args.text_tokens, dtype)
    with torch.no_grad():
        for _ in range(args.warmups):     # the prefetch learns which block starts a call from a finished one
            model(**inputs)
        read["bytes"], times, io = 0, [], {"rchar": 0, "read_bytes": 0}
        for _ in range(args.forwards):
            if args.drop_cache:
                drop_file_cache(args.file)
            io0, t0 = _io(), time.perf_counter()
            out = model(**inputs)[0]
            times.append(time.perf_counter() - t0)
            io1 = _io()
            for k in io:
                io[k] += io1[k] - io0[k]
    peak = sampler.stop()
    torch.save(out, args.result + ".pt")
    plan = info.plan
    result = {"mode": args.mode, "budget": int(args.budget) if args.mode == "budget" else None,
              "baseline_rss_bytes": baseline["VmRSS"], "load_s": load_s, "s_per_forward": sum(times) / len(times),
              "forward_s": times, "read_bytes_per_forward": read["bytes"] / args.forwards,
              "io_rchar_per_forward": io["rchar"] / args.forwards,
              "io_disk_read_bytes_per_forward": io["read_bytes"] / args.forwards, "page_cache_dropped": args.drop_cache,
              "held_peak_bytes": info.peak_bytes + (plan.work if plan else 0),
              "work_bytes": plan.work if plan else None,
              "resident_bytes": info.resident_bytes,
              "rss_after_load_bytes": after_load["VmRSS"], "rss_after_forwards_bytes": _status()["VmRSS"],
              "at_peak": peak, "vmhwm_bytes": _status()["VmHWM"],
              "resident_units": len(plan.resident) if plan else None, "units": len(plan.units) if plan else None,
              "residency": info.residency, "output_checksum": float(out.double().sum()),
              "self_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    with open(args.result, "w") as f:
        json.dump(result, f)
    return 0


class _Planned(Exception):
    pass


def _plan(file: str, config: dict, dtype: str):
    """Budget mode's plan at a budget that holds everything (units, fixed bytes, work), made by
    ``load`` and caught before it reads any tensor (a full load of a 13 GB file would hold it all)."""
    import torch

    import quantkit.runtime as qr
    from quantkit.runtime import budget, loader

    def caught(*args, **kwargs):
        raise _Planned(budget.plan(*args, **kwargs))
    loader.plan = caught
    try:
        qr.load(_empty(config), file, mode="budget", max_memory=10**15, compute_dtype=getattr(torch, DTYPES[dtype]))
    except _Planned as planned:
        return planned.args[0]
    finally:
        loader.plan = budget.plan
    raise RuntimeError("load made no plan")


def _rows(spec: str | None, plan, file_bytes: int, steps: int) -> list[tuple[str, int]]:
    """``--rows`` ("resident,streamed,budget:4GB,budget:half") or the default sweep: resident,
    streamed, and ``steps`` + 1 budgets from the smallest that works to everything."""
    if spec is None:
        smallest = plan.fixed + plan.work + sum(sorted(plan.units.values(), reverse=True)[:2])
        return [("resident", 0), ("streamed", 0),
                *(("budget", smallest + (plan.peak - smallest) * i // steps) for i in range(steps + 1))]
    from quantkit.options import parse_size
    rows = []
    for item in spec.split(","):
        mode, _, size = item.partition(":")
        smallest = plan.fixed + plan.work + sum(sorted(plan.units.values(), reverse=True)[:2])
        named = {"half": file_bytes // 2, "halfread": file_bytes // 2 + smallest, "smallest": smallest}
        rows.append((mode, (named[size] if size in named else parse_size(size)) if size else 0))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--blocks", default="1,2", help="double,single blocks (FLUX.1-dev: 19,38)")
    ap.add_argument("--compute-dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--steps", type=int, default=4, help="budgets between the smallest and everything, ends included")
    ap.add_argument("--rows", help="instead of the sweep: e.g. resident,budget:4GB,budget:half (half the file); "
                         "budget:smallest; "
                         "budget:halfread (half the file + the smallest: the streamed blocks are about half the file)")
    ap.add_argument("--forwards", type=int, default=2)
    ap.add_argument("--warmups", type=int, default=2, help="untimed forwards first (2: the prefetch has seen a call)")
    ap.add_argument("--drop-cache", action="store_true",
                    help="evict the file from the page cache before each timed forward: reads come from the disk")
    ap.add_argument("--tokens", type=int, default=64, help="image tokens (a 256x256 image is 256)")
    ap.add_argument("--text-tokens", type=int, default=16)
    ap.add_argument("--fp8", help="an FP8 file made before (with --config): not written, not deleted")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", help="the model's config.json (with --fp8; else written to --out-dir)")
    ap.add_argument("--file", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--budget", default="0", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)
    os.makedirs(args.out_dir, exist_ok=True)
    if args.fp8:
        out, config_path = args.fp8, args.config
        with open(config_path) as f:
            config = json.load(f)
        double, single = config["num_layers"], config["num_single_layers"]
    else:
        double, single = (int(x) for x in args.blocks.split(","))
        config = {**model_output.FLUX_DEV, "num_layers": double, "num_single_layers": single}
        src, out = os.path.join(args.out_dir, "flux-src"), os.path.join(args.out_dir, "flux-fp8.safetensors")
        config_path = os.path.join(args.out_dir, "config.json")
        with open(config_path, "w") as f:
            json.dump(config, f)
        if not os.path.exists(out):
            model_output.write_model(src, config)
            m = harness.measure(harness.quantkit_cmd() + ["convert", src, out, "--format", "native", "--overwrite",
                                                          "-q"], os.path.join(args.out_dir, "convert.log"))
            if m["rc"] != 0:
                print(m["log_tail"], file=sys.stderr)
                return 1
    plan = _plan(out, config, args.compute_dtype)
    rows = _rows(args.rows, plan, os.path.getsize(out), args.steps)
    results = {"blocks": [double, single], "file_bytes": os.path.getsize(out), "compute_dtype": args.compute_dtype,
               "tokens": args.tokens, "text_tokens": args.text_tokens, "page_cache_dropped": args.drop_cache,
               "plan": {"fixed": plan.fixed, "work": plan.work, "largest_units": sorted(plan.units.values())[-2:]},
               "machine": harness.machine_info(args.out_dir), "command": sys.argv, "rows": []}
    if not args.drop_cache:
        harness.warm_page_cache(out)
    reference = None
    for mode, budget in rows:
        result = os.path.join(args.out_dir, "row.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--out-dir", args.out_dir, "--file", out,
               "--config", config_path, "--mode", mode, "--budget", str(budget), "--result", result,
               "--forwards", str(args.forwards), "--warmups", str(args.warmups), "--tokens", str(args.tokens),
               "--text-tokens", str(args.text_tokens), "--compute-dtype", args.compute_dtype] + (
               ["--drop-cache"] if args.drop_cache else [])
        harness.settle()
        m = harness.measure(cmd, os.path.join(args.out_dir, "row.log"))
        if m["rc"] != 0:         # e.g. killed by the kernel's OOM killer (rc -9): the row says so, the rest run
            print(f"{mode} {budget}: exit {m['rc']}\n{m['log_tail']}", file=sys.stderr)
            results["rows"].append({"mode": mode, "budget": budget or None, "failed_rc": m["rc"],
                                    "log_tail": m["log_tail"], "same_output_as_first_row": None})
            continue
        row = {**harness.read_json(result), "peak_rss_bytes": m["peak_rss_bytes"], "wall_s": m["wall_s"],
               "cpu_pressure": m["cpu_pressure"]}
        row["same_output_as_first_row"] = _same(reference, result + ".pt")
        if reference is None:
            reference = result + ".first.pt"
            os.replace(result + ".pt", reference)
        results["rows"].append(row)
        print(_line(row), file=sys.stderr)
    results["all_outputs_equal"] = all(r["same_output_as_first_row"] for r in results["rows"] if "failed_rc" not in r)
    print(f"file {results['file_bytes'] / 1e9:.3f} GB; every row's output the same, bit for bit: "
          f"{results['all_outputs_equal']}", file=sys.stderr)
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if not args.keep and not args.fp8:
        shutil.rmtree(src, ignore_errors=True)
        for p in (out, out.replace(".safetensors", ".quantkit.json")):
            if os.path.exists(p):
                os.unlink(p)
    return 0


def _same(reference: str | None, path: str) -> bool:
    """The row's output equals the first row's, bit for bit (True for the first row itself)."""
    if reference is None:
        return True
    import torch
    a, b = torch.load(reference), torch.load(path)
    bits = [t.contiguous().reshape(-1).view(torch.uint8) for t in (a, b)]     # NaN == NaN where the bits are
    return bool(a.dtype == b.dtype and a.shape == b.shape and torch.equal(*bits))


def _line(r: dict) -> str:
    return (f"{r['mode']:9} budget {(r['budget'] or 0) / 1e9:6.3f} GB: peak RSS {r['peak_rss_bytes'] / 1e9:.3f} GB, "
            f"{r['s_per_forward']:.2f} s/forward, read {r['read_bytes_per_forward'] / 1e9:.3f} GB/forward")


def table(results: dict) -> str:
    lines = ["| mode | max_memory | resident blocks | held (runtime's count) | peak RSS | baseline RSS | s / forward | "
             "read / forward |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["rows"]:
        budget = f"{r['budget'] / 1e9:.3f} GB" if r["budget"] else "-"
        if "failed_rc" in r:
            lines.append(f"| {r['mode']} | {budget} | exit {r['failed_rc']} (not run to the end) | | | | | |")
            continue
        units = f"{r['resident_units']} of {r['units']}" if r["units"] is not None else "-"
        lines.append(f"| {r['mode']} | {budget} | {units} | {r['held_peak_bytes'] / 1e9:.3f} GB | "
                     f"{r['peak_rss_bytes'] / 1e9:.3f} GB | {r['baseline_rss_bytes'] / 1e9:.3f} GB | "
                     f"{r['s_per_forward']:.2f} | {r['read_bytes_per_forward'] / 1e9:.3f} GB |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
