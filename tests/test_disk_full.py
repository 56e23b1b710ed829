"""A real write failure in the middle of a real `quantkit convert`: one line naming the output,
exit 2, no temporary file left, nothing under the final name, the source untouched.

Two real failures, no mock: the kernel's file-size limit (RLIMIT_FSIZE: write() fails with
EFBIG once the output reaches it; works unprivileged) and a full filesystem (a 24 MB tmpfs:
ENOSPC; needs the right to mount, skipped where it is missing).
"""
import os
import resource
import shutil
import signal
import subprocess
import uuid

import pytest
from runs import OUTPUTS, convert_cmd, llama_like_source, sha256

from quantkit.writer import TEMP_MARK

LIMIT = 24 << 20        # bytes: the ~64 MB source's ~32 MB output does not fit


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return llama_like_source(tmp_path_factory.mktemp("full-src"))


def convert(source, out, extra, **popen):
    return subprocess.run(convert_cmd(source, out, extra), capture_output=True, text=True, check=False, **popen)


def assert_clean_failure(result, folder, out, source, before, what):
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and what in lines[0], result.stderr
    assert f"error: {out}" in lines[0] and TEMP_MARK not in lines[0], lines[0]     # the output, not its temp
    assert "Traceback" not in result.stderr
    assert not os.path.exists(out)
    assert [n for n in os.listdir(folder) if TEMP_MARK in n] == [], os.listdir(folder)
    assert os.listdir(folder) == [], os.listdir(folder)
    assert sha256(source) == before


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)       # write() then fails with EFBIG instead of a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


@pytest.mark.parametrize("output", list(OUTPUTS))
def test_file_size_limit_mid_write(source, tmp_path, output):
    name, extra = OUTPUTS[output]
    folder = tmp_path / "dst"
    folder.mkdir()
    before = sha256(source)
    result = convert(source, folder / name, extra, preexec_fn=_limit_file_size)
    if output.startswith("shards"):     # 8 MB shards each fit under the limit: the conversion succeeds
        assert result.returncode == 0, result.stderr
        return
    assert_clean_failure(result, folder, folder / name, source, before, "File too large")


@pytest.fixture
def small_filesystem(tmp_path):
    mnt = tmp_path / f"tmpfs-{uuid.uuid4().hex[:8]}"
    mnt.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={LIMIT}", "tmpfs", str(mnt)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.parametrize("output", list(OUTPUTS))
def test_full_disk_mid_write(source, small_filesystem, output):
    name, extra = OUTPUTS[output]
    before = sha256(source)
    result = convert(source, small_filesystem / name, extra)
    assert_clean_failure(result, small_filesystem, small_filesystem / name, source, before, "disk full")
