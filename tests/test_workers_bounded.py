"""Bounded workers, one exit contract.

What it proves: a --jobs the user types is capped at the cores, the free memory (0.5 GB a job)
and the work's pieces, with one note line (``cap_jobs``); `convert` and `validate --jobs 100000`
run no more worker processes than cores (counted from /proc while they run), exit 0 and say they
capped; a second run writing a path another run is writing fails with exit 2 and one line, and a
file that appeared meanwhile is never replaced by the rename; an unwritable destination is refused
before any work; a SIGTERM landing while torch starts up is not swallowed.
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

from quantkit import workers
from quantkit.dtypes import BF16
from quantkit.errors import OutputError
from quantkit.writer import OutputTensor, SafetensorsWriter, TempFolder
from runs import children, partials

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
LINUX = sys.platform.startswith("linux")
UNWRITABLE = "/sys"          # refuses new files even to root (os.access says yes to root anywhere)


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "quantkit.cli", *map(str, args)], capture_output=True, text=True,
                          **kw)


# ----------------------------------------------------------------------------- cap_jobs

def test_cap_jobs_bounds_by_cores_memory_and_pieces(monkeypatch):
    monkeypatch.setattr(workers, "_cores", lambda: 8)
    monkeypatch.setattr(workers, "available_memory", lambda: 64 << 30)
    assert workers.cap_jobs(4) == (4, None)
    assert workers.cap_jobs(8, pieces=20) == (8, None)
    assert workers.cap_jobs(100000) == (8, "--jobs 100000 capped at 8: the machine has 8 cores")
    assert workers.cap_jobs(6, pieces=3) == (3, "--jobs 6 capped at 3: the work has 3 pieces")
    monkeypatch.setattr(workers, "available_memory", lambda: 3 * workers.JOB_BYTES + 1)
    jobs, note = workers.cap_jobs(100000, pieces=50)
    assert jobs == 3 and note.startswith("--jobs 100000 capped at 3: the free memory")
    monkeypatch.setattr(workers, "available_memory", lambda: 0)       # nearly nothing free: still one job
    assert workers.cap_jobs(5)[0] == 1
    monkeypatch.setattr(workers, "available_memory", lambda: None)    # no /proc/meminfo: the cores decide
    assert workers.cap_jobs(100000)[0] == 8


# ----------------------------------------------------------------------------- --jobs 100000

def _source(folder, tensors=12, rows=512):
    g = torch.Generator().manual_seed(3)
    save_file({f"model.layers.{i}.mlp.up_proj.weight": torch.randn(rows, 1024, generator=g).to(torch.bfloat16)
               for i in range(tensors)}, str(folder / "src.safetensors"))
    return folder / "src.safetensors"


def run_counting_workers(cmd) -> tuple[int, str, str, int]:
    """Run ``cmd``, counting its child processes while it runs; (rc, stdout, stderr, most seen).
    More than the cores: the whole group is killed at once (an uncapped run forks thousands)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    most = 0
    try:
        while proc.poll() is None:
            most = max(most, len(children(proc.pid)))
            if most > CORES:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.002)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, out, err, most


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="counts the workers in /proc")
def test_jobs_100000_run_like_the_machines_count(tmp_path):
    src = _source(tmp_path)
    ref = tmp_path / f"ref-{CORES}"
    r = cli("convert", src, ref, "-q", "--max-shard-size", "1MB", "--jobs", CORES)
    assert r.returncode == 0 and "capped" not in r.stdout, r.stderr

    out = tmp_path / "many"
    cmd = [sys.executable, "-m", "quantkit.cli", "convert", str(src), str(out), "-q", "--max-shard-size", "1MB",
           "--jobs", "100000", "--json", str(tmp_path / "c.json")]
    rc, stdout, stderr, most = run_counting_workers(cmd)
    assert most <= CORES, f"{most} worker processes on {CORES} cores"
    assert rc == 0, stderr
    capped = [line for line in stdout.splitlines() if "capped" in line]
    assert capped == [f"  --jobs 100000 capped at {CORES}: the machine has {CORES} core{'s' * (CORES != 1)}"]
    summary = json.loads((tmp_path / "c.json").read_text())
    assert summary["jobs"] == CORES and capped[0].strip() in summary["notes"]
    assert sorted(os.listdir(out)) == sorted(os.listdir(ref))
    for name in os.listdir(out):
        if name != "quantkit.json":
            assert (out / name).read_bytes() == (ref / name).read_bytes(), name

    for target in (out, ref):
        cmd = [sys.executable, "-m", "quantkit.cli", "validate", str(target), "--against", str(src), "-q",
               "--jobs", "100000", "--json", str(tmp_path / "v.json"), "--overwrite"]
        rc, stdout, stderr, most = run_counting_workers(cmd)
        assert most <= CORES, f"{most} worker processes on {CORES} cores"
        assert rc == 0, stderr
        assert [line for line in stdout.splitlines() if "capped" in line] == [
            f"  note: --jobs 100000 capped at {CORES}: the machine has {CORES} core{'s' * (CORES != 1)}"]
        report = json.loads((tmp_path / "v.json").read_text())
        assert report["ok"] and report["jobs"] <= CORES
        assert any(n.startswith("--jobs 100000 capped") for n in report["notes"])


def test_jobs_on_a_single_file_output_says_it_has_nothing_to_share(tmp_path):
    # it said "--jobs 8 capped at 2: the machine has 2 cores", as if two processes were writing it
    src = _source(tmp_path, tensors=2, rows=64)
    r = cli("convert", src, tmp_path / "one.safetensors", "--jobs", 8, "--json", tmp_path / "c.json")
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "c.json").read_text())
    assert summary["jobs"] == 1 and not any("capped" in n for n in summary["notes"])
    assert [n for n in summary["notes"] if n.startswith("--jobs 8")] == [
        "--jobs 8 has nothing to share out: the output is one file, written by one process "
        "(--max-shard-size cuts it into shards that --jobs writes side by side)"]
    assert cli("convert", src, tmp_path / "two.safetensors", "--jobs", 1, "--json", tmp_path / "d.json").returncode == 0
    assert not any(n.startswith("--jobs") for n in json.loads((tmp_path / "d.json").read_text())["notes"])


# ----------------------------------------------------------------------------- two runs, one path

SPECS = [OutputTensor("a", BF16, (4, 4))]


def _other_writer(final):
    """A live process (not this one) that holds a temporary file for ``final``."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    temp = final.parent / f".{final.name}.quantkit-partial.{proc.pid}"
    temp.write_bytes(b"x")
    return proc, temp


def test_a_second_run_on_a_path_being_written_fails_at_once(tmp_path):
    src = _source(tmp_path, tensors=2, rows=64)
    for args, final in ((["convert", src, tmp_path / "o.safetensors"], tmp_path / "o.safetensors"),
                        (["calibrate", src, "-o", tmp_path / "s.safetensors"], tmp_path / "s.safetensors")):
        proc, temp = _other_writer(final)
        try:
            r = cli(*args, "-q")
        finally:
            proc.kill()
            proc.wait()
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and f"another run (process {proc.pid}) is writing it now" in lines[0], r.stderr
        assert not final.exists() and temp.exists()       # the other run's file is left to it
        temp.unlink()


def test_a_file_that_appeared_meanwhile_is_not_replaced(tmp_path):
    final = tmp_path / "o.safetensors"
    with pytest.raises(OutputError, match="another run wrote this path"):
        with SafetensorsWriter(str(final), SPECS, {}) as w:
            w.write(bytes(32))
            final.write_bytes(b"the other run's")      # another run renamed its output into place
            w.finish()
    assert final.read_bytes() == b"the other run's" and partials(tmp_path) == []
    folder = tmp_path / "dir"
    with pytest.raises(OutputError, match="another run wrote this path"):
        with TempFolder(str(folder)) as t:
            (tmp_path / "dir").mkdir()
            (folder / "theirs").write_text("x")
            t.commit()
    assert os.listdir(folder) == ["theirs"] and partials(tmp_path) == []
    with SafetensorsWriter(str(final), SPECS, {}, overwrite=True) as w:       # existed before: replaced
        w.write(bytes(32))
        w.finish()
    assert final.stat().st_size > 32


# ----------------------------------------------------------------------------- unwritable destinations

@pytest.mark.skipif(not (LINUX and os.path.isdir(UNWRITABLE)), reason="needs a folder nobody may write")
def test_unwritable_destinations_are_refused_before_any_work(tmp_path):
    probe = os.path.join(UNWRITABLE, "quantkit-test-probe")
    try:
        open(probe, "w").close()
        os.unlink(probe)
        pytest.skip(f"{UNWRITABLE} is writable here")
    except OSError:
        pass
    src = _source(tmp_path, tensors=2, rows=64)
    out = tmp_path / "out.safetensors"
    assert cli("convert", src, out, "-q").returncode == 0
    assert cli("calibrate", src, "-o", tmp_path / "s.safetensors", "-q").returncode == 0
    nowhere = UNWRITABLE + "/quantkit-out"
    cases = [["convert", src, nowhere + ".safetensors"],
             ["convert", src, nowhere, "--max-shard-size", "1MB"],
             ["convert", src, tmp_path / "o2.safetensors", "--json", nowhere + ".json"],
             ["calibrate", src, "-o", nowhere + ".safetensors"],
             ["publish", out, nowhere],
             ["validate", out, "--report", nowhere],
             ["validate", out, "--json", nowhere + ".json"],
             ["stats", "show", tmp_path / "s.safetensors", "--report", nowhere],
             ["stats", "show", tmp_path / "s.safetensors", "--json", nowhere + ".json"]]
    for args in cases:
        r = cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "the folder is not writable" in lines[0], (args, r.stderr)
        assert UNWRITABLE in lines[0]
    assert not (tmp_path / "o2.safetensors").exists()      # refused before the conversion, not after it


# ----------------------------------------------------------------------------- signals at start-up

SWALLOW = """
import sys
import quantkit.cli as cli

class Signal:
    '''A SIGTERM landing while numpy is imported (the first time only), as the handler raises it.'''
    fired = False
    def find_spec(self, name, path=None, target=None):
        if name == "numpy" and not Signal.fired:
            Signal.fired = True
            raise cli.Terminated()
        return None

sys.meta_path.insert(0, Signal())
sys.argv[0] = "quantkit"
cli.run()
"""


def test_a_sigterm_during_torchs_start_up_is_not_swallowed(tmp_path):
    """torch's C start-up imports numpy and clears any error: a SIGTERM then was lost, and the
    command ran to its end with exit 0."""
    src = _source(tmp_path, tensors=2, rows=64)
    r = subprocess.run([sys.executable, "-c", SWALLOW, "calibrate", str(src), "-o", str(tmp_path / "s.safetensors"),
                        "-q"], capture_output=True, text=True)
    assert r.returncode == 143, r.stderr
    assert "terminated: stopped" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "s.safetensors").exists()
