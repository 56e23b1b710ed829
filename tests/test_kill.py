"""SIGKILL at random moments of a real `quantkit convert` never loses anything.

One ~64 MB BF16 checkpoint is converted once, uninterrupted, as the reference (validated in
full; conversion is deterministic, so every complete output must equal it byte for byte).
Then 20 times: a conversion in a subprocess is SIGKILLed after a seeded random delay, spread
from the very start (interpreter start-up), through the write phase (timed from the moment
the temporary file appears, so a slow or busy machine still gets kills there), to just past
the end.
After each kill: the source's SHA256 is unchanged; the final name holds nothing, or (the kill
came after the rename) exactly the reference output; and the next run removes the leftover
temporary file, says so, and succeeds, leaving no temporary file of any kind behind.
"""
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

from quantkit.manifest import manifest_path, read_manifest
from quantkit.validation import validate
from quantkit.writer import TEMP_MARK
from runs import sha256

RUNS = 20
SEED = 20240531


def convert_cmd(src, dst, *extra):
    return [sys.executable, "-m", "quantkit.cli", "convert", str(src), str(dst), "-q", *extra]


def partials(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if TEMP_MARK in n)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kill")
    g = torch.Generator().manual_seed(0)
    tensors = {f"blocks.{i}.mlp.fc{j}.weight": torch.randn(1024, 1024, generator=g).to(torch.bfloat16)
               for i in range(16) for j in (1, 2)}
    tensors.update({f"blocks.{i}.norm.weight": torch.ones(1024) for i in range(16)})
    src = folder / "src.safetensors"
    save_file(tensors, str(src))
    return src


def reference_run(src, dst) -> tuple[float, float, float]:
    """Run once to the end; seconds until the temp file appeared, until the final file did, and until exit."""
    t0 = time.monotonic()
    proc = subprocess.Popen(convert_cmd(src, dst), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t_temp = t_final = None
    while proc.poll() is None:
        if t_temp is None and partials(dst.parent):
            t_temp = time.monotonic() - t0
        if t_final is None and dst.exists():
            t_final = time.monotonic() - t0
        time.sleep(0.002)
    t_end = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr.read().decode()
    t_final = t_final if t_final is not None else t_end
    return (t_temp if t_temp is not None else 0.8 * t_final), t_final, t_end


def kill_plan(t_temp: float, t_final: float, t_end: float) -> list[tuple[str, float]]:
    """Seeded kills, each as (event to wait for, delay after it).

    "start": a blind delay from launch, over interpreter start-up and planning.
    "temp": the delay runs from the moment the temporary file appears, so the kill lands in the
    write phase however slow or loaded the machine is (a blind delay measured from one reference
    run missed it on a busy CI machine). "final": from the moment the final name appears.
    """
    rng = random.Random(SEED)
    write, tail = max(t_final - t_temp, 0.01), max(t_end - t_final, 0.01)
    plan = [("start", 0.0)]
    plan += [("start", rng.uniform(0.0, t_temp)) for _ in range(4)]
    plan += [("temp", rng.uniform(0.0, 0.8 * write)) for _ in range(11)]
    plan += [("final", rng.uniform(0.0, tail)) for _ in range(4)]
    return plan


def wait_for(proc, seen) -> None:
    """Poll until `seen()` holds or the process has exited."""
    while proc.poll() is None and not seen():
        time.sleep(0.001)


def test_sigkill_never_loses_anything(source, tmp_path):
    src_sha = sha256(source)
    out = tmp_path / "out.safetensors"
    t_temp, t_final, t_end = reference_run(source, out)
    os.unlink(out)
    os.unlink(manifest_path(str(out)))
    # The first run may be slow (byte-compiling, cold caches): time a second one too, keep the faster.
    t_temp, t_final, t_end = min((t_temp, t_final, t_end), reference_run(source, out), key=lambda t: t[2])
    report = validate(str(out), str(source))
    assert report.ok, report.failures
    ref_sha = sha256(out)
    os.unlink(out)
    os.unlink(manifest_path(str(out)))

    outcomes = []
    for event, delay in kill_plan(t_temp, t_final, t_end):
        proc = subprocess.Popen(convert_cmd(source, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if event == "temp":
            wait_for(proc, lambda: partials(tmp_path))
        elif event == "final":
            wait_for(proc, out.exists)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        rc = proc.wait()
        left = partials(tmp_path)
        outcomes.append((event, round(delay, 3), rc, bool(left), out.exists(), os.path.exists(manifest_path(str(out)))))

        assert sha256(source) == src_sha, f"source changed (kill after {delay:.3f} s)"
        if rc == 0:      # finished before the kill: a complete output with its manifest
            assert sha256(out) == ref_sha and read_manifest(str(out))["files"]["out.safetensors"]["sha256"] == ref_sha
        elif out.exists():   # killed after the atomic rename: the file must be the whole output
            assert sha256(out) == ref_sha, f"partial output under the final name (kill after {delay:.3f} s)"
        # else: nothing under the final name. The manifest is written just before the rename (an
        # output never exists without it), so a kill between the two leaves a manifest alone: it
        # names a file that does not exist, which validate reports, and the next run replaces it.

        extra = ["--overwrite"] if out.exists() else []
        again = subprocess.run(convert_cmd(source, out, *extra), capture_output=True, text=True, check=False)
        assert again.returncode == 0, again.stderr
        for name in left:
            assert f"removed a temporary file left by an interrupted run: {tmp_path / name}" in again.stderr, \
                (name, again.stderr)
        assert partials(tmp_path) == [], f"temporary files survive the next run: {partials(tmp_path)}"
        assert sha256(out) == ref_sha
        assert read_manifest(str(out))["files"]["out.safetensors"]["sha256"] == ref_sha
        assert validate(str(out), check_hash=True).ok
        os.unlink(out)
        os.unlink(manifest_path(str(out)))

    killed = [o for o in outcomes if o[2] == -signal.SIGKILL]
    assert len(outcomes) == RUNS
    assert len(killed) >= RUNS // 2, outcomes            # most kills land inside the run
    assert sum(o[3] for o in killed if o[0] == "temp") >= 5, outcomes   # and many during the write
