"""SHA256 through memory maps (quantkit's hashing of sources, outputs and validated files).

What it proves: the mapped hash equals hashlib's over any byte range (windows that do not start
on a page, empty ranges, a file that is not a multiple of anything), and ``sha256_file`` equals
hashlib's over the whole file.
"""
import hashlib
import os
import random

import pytest

from quantkit.hashing import sha256_file, update_from_file


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 3 * 4096 + 17, (1 << 20) + 5])
def test_mapped_hash_is_hashlibs(tmp_path, size):
    path = tmp_path / "f.bin"
    data = random.Random(size).randbytes(size)
    path.write_bytes(data)
    assert sha256_file(str(path), chunk=8192) == hashlib.sha256(data).hexdigest()
    fd = os.open(path, os.O_RDONLY)
    try:
        for start, end in [(0, size), (size // 3, size), (min(size, 4097), size), (size, size)]:
            sha = hashlib.sha256()
            update_from_file(sha, fd, start, end, window=4096 * 3)
            assert sha.hexdigest() == hashlib.sha256(data[start:end]).hexdigest(), (start, end)
    finally:
        os.close(fd)


def test_a_file_cut_short_while_hashed_is_an_error_not_a_sigbus(tmp_path, monkeypatch):
    """Mapping pages past a file's end kills the process (SIGBUS): the size is checked before
    each window, so a source truncated by another program mid-run is one line, exit 2."""
    import hashlib as _hashlib

    from quantkit import hashing
    from quantkit.errors import UnsupportedInputError
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(3 * hashing.WINDOW_BYTES))
    fd = os.open(path, os.O_RDONLY)
    try:
        sha = _hashlib.sha256()
        hashing.update_from_file(sha, fd, 0, hashing.WINDOW_BYTES)
        os.truncate(path, hashing.WINDOW_BYTES + 1)
        with pytest.raises(UnsupportedInputError, match="shrank"):
            hashing.update_from_file(sha, fd, hashing.WINDOW_BYTES, 3 * hashing.WINDOW_BYTES)
    finally:
        os.close(fd)
    cut = hashing.update_from_file

    def cut_after_first(sha, fd, start, end, window=hashing.WINDOW_BYTES):
        if start > 0:
            os.truncate(path, start)
        cut(sha, fd, start, end, window)
    path.write_bytes(os.urandom(3 * hashing.READ_BYTES))
    monkeypatch.setattr(hashing, "update_from_file", cut_after_first)
    with pytest.raises(UnsupportedInputError) as info:
        hashing.sha256_file(str(path))
    assert info.value.path == str(path)
