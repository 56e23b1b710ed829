"""SIGTERM in every long phase of `validate --jobs 2`, `calibrate` and `publish`: the process and
its workers end within 5 s, exit 143 with one line, and nothing is left under a final name (nor a
temporary file); the sources are untouched.

Phases: validate's workers being forked (the signal as the first one appears), hashing (no
--against: the workers only hash) and comparing (--no-hash-check: they only compare);
calibrate's weight pass with the source hashed beside it; publish's validation and its copy
into the release folder (the signal as the temporary folder appears).
"""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

from runs import alive, children, partials, sha256

DEADLINE = 5.0


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A ~200 MB BF16 checkpoint and its FP8 conversion (long enough phases on any machine)."""
    folder = tmp_path_factory.mktemp("phases")
    g = torch.Generator().manual_seed(0)
    src = folder / "src.safetensors"
    save_file({f"model.layers.{i}.mlp.{p}.weight": torch.randn(2048, 2048, generator=g).to(torch.bfloat16)
               for i in range(12) for p in ("up_proj", "down_proj")}, str(src))
    out = folder / "out.safetensors"
    r = subprocess.run([sys.executable, "-m", "quantkit.cli", "convert", str(src), str(out), "-q"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return src, out


def terminate(cmd, when, tmp_path, sig=signal.SIGTERM, group=False) -> tuple[int, str, float, list[int]]:
    """Start ``cmd``, wait until ``when(proc)`` holds, send it ``sig`` (SIGTERM; ``group``: to its
    whole process group, as a terminal's Ctrl-C); (rc, stderr, seconds from the signal to the exit,
    the workers it had)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            start_new_session=group)
    while proc.poll() is None and not when(proc):
        time.sleep(0.002)
    if proc.poll() is not None:
        pytest.skip(f"the command ended (rc {proc.returncode}) before the phase was reached")
    workers = children(proc.pid)
    t0 = time.monotonic()
    os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
    try:
        rc = proc.wait(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"still running {DEADLINE} s after SIGTERM")
    seconds = time.monotonic() - t0
    while any(alive(w) for w in workers) and time.monotonic() - t0 < DEADLINE:
        time.sleep(0.01)
    return rc, proc.stderr.read(), seconds, workers


def started(seconds):
    t0 = time.monotonic()
    return lambda proc: time.monotonic() - t0 >= seconds


def workers_seen(after=0.0):
    seen = []

    def when(proc):
        if not seen and children(proc.pid):
            seen.append(time.monotonic())
        return bool(seen) and time.monotonic() - seen[0] >= after
    return when


def check_stopped(rc, stderr, seconds, workers, tmp_path, finals):
    assert rc == 143, stderr
    assert "terminated: stopped" in stderr and "Traceback" not in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert seconds < DEADLINE
    assert not [w for w in workers if alive(w)], "a worker outlived the SIGTERM"
    for final in finals:
        assert not final.exists(), final
    assert partials(tmp_path) == []


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="reads the process tree from /proc")
@pytest.mark.parametrize("phase", ["forking", "hashing", "comparing"])
def test_sigterm_in_validate_jobs_2(model, tmp_path, phase):
    src, out = model
    before = sha256(out), sha256(src)
    report = tmp_path / "report.json"
    extra = {"forking": ["--against", src], "hashing": [], "comparing": ["--against", src, "--no-hash-check"]}[phase]
    cmd = [sys.executable, "-m", "quantkit.cli", "validate", str(out), *map(str, extra), "-q", "--jobs", "2",
           "--json", str(report)]
    after = {"forking": 0.0, "hashing": 0.02, "comparing": 0.3}[phase]     # from the first worker seen
    rc, stderr, seconds, workers = terminate(cmd, workers_seen(after), tmp_path)
    if phase != "forking":
        assert workers, "the workers were running"
    check_stopped(rc, stderr, seconds, workers, tmp_path, [report])
    assert (sha256(out), sha256(src)) == before


@pytest.mark.parametrize("delay", [0.3, 1.0])
def test_sigterm_in_calibrate(model, tmp_path, delay):
    src, _ = model
    before = sha256(src)
    stats = tmp_path / "stats.safetensors"
    cmd = [sys.executable, "-m", "quantkit.cli", "calibrate", str(src), "-o", str(stats), "-q", "--observer", "mse",
           "--json", str(tmp_path / "c.json")]
    when = started(0.8 + delay)      # past the start-up (~0.8 s): the weight pass, the source hashed beside it
    rc, stderr, seconds, workers = terminate(cmd, when, tmp_path)
    check_stopped(rc, stderr, seconds, workers, tmp_path, [stats, tmp_path / "c.json"])
    assert sha256(src) == before


@pytest.mark.parametrize("phase", ["validating", "copying"])
def test_sigterm_in_publish(model, tmp_path, phase):
    src, out = model
    before = sha256(out), sha256(src)
    release = tmp_path / "release"
    cmd = [sys.executable, "-m", "quantkit.cli", "publish", str(out), str(release), "--against", str(src), "-q"]
    when = started(1.2) if phase == "validating" else (lambda proc: bool(partials(tmp_path)))
    rc, stderr, seconds, workers = terminate(cmd, when, tmp_path)
    check_stopped(rc, stderr, seconds, workers, tmp_path, [release])
    assert (sha256(out), sha256(src)) == before


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="reads the process tree from /proc")
@pytest.mark.parametrize("after", [0.0, 0.3])
def test_ctrl_c_while_validate_forks_its_workers(model, tmp_path, after):
    """Ctrl-C reaches the whole group, workers being forked included: exit 130, none left."""
    src, out = model
    cmd = [sys.executable, "-m", "quantkit.cli", "validate", str(out), "--against", str(src), "-q", "--jobs", "2"]
    rc, stderr, seconds, workers = terminate(cmd, workers_seen(after), tmp_path, signal.SIGINT, group=True)
    assert rc == 130, stderr
    assert "interrupted: stopped" in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert seconds < DEADLINE and not [w for w in workers if alive(w)]


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="reads the process tree from /proc")
def test_sigkill_of_validate_takes_its_workers(model, tmp_path):
    src, out = model
    cmd = [sys.executable, "-m", "quantkit.cli", "validate", str(out), "--against", str(src), "-q", "--jobs", "2"]
    rc, _, _, workers = terminate(cmd, workers_seen(0.2), tmp_path, signal.SIGKILL)
    assert rc == -signal.SIGKILL and workers
    deadline = time.monotonic() + DEADLINE
    while any(alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(alive(w) for w in workers), "a worker outlived its killed parent"


@pytest.mark.parametrize("wrapped_in", ["ImportError", "QuantkitError"])
def test_a_signal_wrapped_in_another_error_still_stops(wrapped_in):
    """A C extension whose start-up a SIGTERM interrupts (scipy's, imported by transformers while
    calibrate builds the model) raises "ImportError: initialization failed" from it: exit 143 and
    the one line, not an internal error's traceback and exit 3 (nor a refusal, exit 2)."""
    import click
    from click.testing import CliRunner

    from quantkit import cli
    from quantkit.errors import QuantkitError

    @click.group(cls=cli._Group)
    def group():
        pass

    @group.command()
    def work():
        try:
            try:
                raise cli.Terminated()
            except KeyboardInterrupt as exc:
                if wrapped_in == "ImportError":
                    raise ImportError("initialization failed") from exc
                raise QuantkitError("cannot import the --inputs module") from exc
        except QuantkitError as exc:
            cli._fail(exc)

    result = CliRunner().invoke(group, ["work"])
    assert result.exit_code == 143, result.output
    assert result.output.strip() == "terminated: stopped; nothing half-written is left under the output's name"
