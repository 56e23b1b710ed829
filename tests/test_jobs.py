"""convert --jobs: the shards of a sharded output written by worker processes side by side.

What it proves: the output is the same, byte for byte (every shard, the index, the manifest's
hashes), whatever the number of jobs and the granularity; a worker's failure is one line, exit
2, with nothing left behind; a parent killed with SIGKILL takes its workers with it (none stays
writing), and the next run removes what they left.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

from quantkit.manifest import read_manifest
from runs import alive, children, partials, sha256

SHARDS = 4
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def sharded_source(folder, rows=256, poison=None):
    """A 4-shard BF16 checkpoint with its index (MLP weights, norms); ``poison``: a tensor holding NaN."""
    g = torch.Generator().manual_seed(1)
    weight_map = {}
    for s in range(SHARDS):
        tensors = {}
        for i in range(3 * s, 3 * s + 3):
            for p in ("up_proj", "down_proj"):
                tensors[f"model.layers.{i}.mlp.{p}.weight"] = torch.randn(rows, 512, generator=g).to(torch.bfloat16)
            tensors[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(512, dtype=torch.bfloat16)
        if poison in tensors:
            tensors[poison][3, 5] = float("nan")
        name = f"model-{s + 1:05d}-of-{SHARDS:05d}.safetensors"
        save_file(tensors, str(folder / name))
        weight_map.update(dict.fromkeys(tensors, name))
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def convert(src, out, *extra):
    cmd = [sys.executable, "-m", "quantkit.cli", "convert", str(src), str(out), "-q", "--max-shard-size", "700KB",
           *extra]
    return subprocess.run(cmd, capture_output=True, text=True)


def tree(folder) -> dict[str, str]:
    return {name: sha256(folder / name) for name in sorted(os.listdir(folder))}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return sharded_source(tmp_path_factory.mktemp("jobs-src"))


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_jobs_write_the_same_bytes(source, tmp_path, granularity):
    outs = {}
    for jobs in (1, 2, 3):
        out = tmp_path / f"out-{jobs}"
        r = convert(source, out, "--jobs", str(jobs), "--granularity", granularity, "--json", tmp_path / f"{jobs}.json")
        assert r.returncode == 0, r.stderr
        outs[jobs] = tree(out)
        summary = json.loads((tmp_path / f"{jobs}.json").read_text())
        assert summary["jobs"] == min(jobs, CORES)      # capped at the cores (test_workers_bounded.py)
        assert (summary["workers_peak_rss_bytes"] > 0) == (jobs > 1)
    one = outs[1]
    assert sum(n.endswith(".safetensors") for n in one) >= SHARDS      # a sharded output, with its index
    assert "model.safetensors.index.json" in one
    without_manifest = {n: h for n, h in one.items() if n != "quantkit.json"}
    for jobs in (2, 3):
        assert {n: h for n, h in outs[jobs].items() if n != "quantkit.json"} == without_manifest
    manifests = [read_manifest(str(tmp_path / f"out-{jobs}")) for jobs in (1, 2, 3)]
    assert all(m["files"] == manifests[0]["files"] and m["source"] == manifests[0]["source"] for m in manifests)
    # every hash in the manifest is what sha256sum says of the file, and the source's of its shards
    assert {n: e["sha256"] for n, e in manifests[0]["files"].items()} == without_manifest
    assert {f["name"]: f["sha256"] for f in manifests[0]["source"]["files"]} == {
        n: sha256(source.parent / n) for n in os.listdir(source.parent) if n.endswith(".safetensors")}


def test_a_failing_worker_is_one_line_and_leaves_nothing(tmp_path):
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    source = sharded_source(src_dir, poison="model.layers.7.mlp.up_proj.weight")
    out = tmp_path / "out"
    r = convert(source, out, "--jobs", "2")
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "model.layers.7.mlp.up_proj.weight" in lines[0]
    assert "Traceback" not in r.stderr
    assert not out.exists() and partials(tmp_path) == []


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="reads the process tree from /proc")
def test_sigkill_of_the_parent_takes_its_workers(tmp_path):
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    source = sharded_source(src_dir, rows=2048)      # ~25 MB: the workers are still writing when the kill lands
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "quantkit.cli", "convert", str(source), str(out), "-q", "--max-shard-size", "4MB",
           "--jobs", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = []
    while proc.poll() is None and not (workers and any(".safetensors" in p for p in partials(tmp_path))):
        workers = children(proc.pid)
        time.sleep(0.001)
    if proc.poll() is not None:
        pytest.skip("the conversion ended before its workers were seen writing")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while any(alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(alive(w) for w in workers), "a worker outlived its killed parent"
    assert not out.exists()
    again = convert(source, out, "--jobs", "2")
    assert again.returncode == 0, again.stderr
    assert "removed a temporary file left by an interrupted run" in again.stderr
    assert partials(tmp_path) == []
    assert {n: e["sha256"] for n, e in read_manifest(str(out))["files"].items()} == {
        n: h for n, h in tree(out).items() if n != "quantkit.json"}


def validate_cli(out, src, *extra):
    cmd = [sys.executable, "-m", "quantkit.cli", "validate", str(out), "--against", str(src), "-q", *extra]
    return subprocess.run(cmd, capture_output=True, text=True)


def test_validate_jobs_report_the_same(source, tmp_path):
    """validate --jobs N: the same report (every tensor's figures, hashes, verdict) as one process,
    on a sharded output and on a single file; a flipped byte in a shard and a changed source shard
    fail alike, named, whatever N."""
    out = tmp_path / "out"
    assert convert(source, out, "--jobs", "1").returncode == 0
    single = tmp_path / "one.safetensors"
    r = subprocess.run([sys.executable, "-m", "quantkit.cli", "convert", str(source), str(single), "-q"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    clean = {}
    for target in (out, single):
        reports = clean[target] = {}
        for jobs in (1, 2, 3):
            r = validate_cli(target, source, "--jobs", str(jobs), "--json", tmp_path / f"v{jobs}.json", "--overwrite")
            assert r.returncode == 0, r.stderr
            reports[jobs] = json.loads((tmp_path / f"v{jobs}.json").read_text())
            assert reports[jobs]["jobs"] == min(jobs, CORES) and (reports[jobs]["workers_peak_rss_bytes"] > 0) == (jobs > 1)
            reports[jobs]["notes"] = [n for n in reports[jobs]["notes"] if not n.startswith("--jobs ")]   # capped
        strip = lambda rep: {k: v for k, v in rep.items() if k not in ("seconds", "jobs", "workers_peak_rss_bytes")}
        assert strip(reports[2]) == strip(reports[1]) == strip(reports[3])
        assert len(reports[1]["tensors"]) == SHARDS * 9 and len(reports[1]["hashes"]) >= 2

    # one flipped byte in the last tensor of an output shard: its hash and its tensor's figures
    shard = sorted(n for n in os.listdir(out) if n.endswith(".safetensors"))[-1]
    raw = bytearray((out / shard).read_bytes())
    raw[-3] ^= 0x40
    (out / shard).write_bytes(bytes(raw))
    failed = {}
    for jobs in (1, 2):
        r = validate_cli(out, source, "--jobs", str(jobs), "--json", tmp_path / f"f{jobs}.json", "--overwrite")
        assert r.returncode == 1, r.stderr
        failed[jobs] = json.loads((tmp_path / f"f{jobs}.json").read_text())
        assert any(shard in f and "sha256 mismatch" in f for f in failed[jobs]["failures"]), failed[jobs]["failures"]
    assert failed[1]["failures"] == failed[2]["failures"] and failed[1]["tensors"] == failed[2]["tensors"]
    assert failed[1]["tensors"] != clean[out][1]["tensors"]       # the flipped byte moved a tensor's figures


def test_validate_jobs_keep_structural_failures_without_any_piece(tmp_path):
    """With nothing to hash (--no-hash-check) and nothing to compare (no tensor in common), the
    missing and extra tensors are still failures with --jobs 2, as with one process."""
    from quantkit.validation import validate
    src, other = tmp_path / "src.safetensors", tmp_path / "other.safetensors"
    save_file({"a.weight": torch.randn(64, 64).to(torch.bfloat16)}, str(src))
    save_file({"b.weight": torch.randn(64, 64).to(torch.bfloat16)}, str(other))
    out = tmp_path / "out.safetensors"
    r = subprocess.run([sys.executable, "-m", "quantkit.cli", "convert", str(src), str(out), "-q"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    reports = [validate(str(out), str(other), check_hash=False, jobs=jobs) for jobs in (1, 2)]
    assert not reports[0].ok and reports[0].failures
    assert reports[1].failures == reports[0].failures and reports[1].tensors == reports[0].tensors == []
