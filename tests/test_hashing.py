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


def test_early_hash_is_taken_over_only_for_the_same_unchanged_files(tmp_path):
    """``hash_early`` (started by the CLI before torch is imported) is handed over by
    ``background_hash`` for the very same files, by real path; a file rewritten since gets a
    fresh hash of its new bytes; ``drop_early`` stops the rest."""
    import hashlib
    import os
    import time

    from quantkit import hashing
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(os.urandom(3 << 20))
    b.write_bytes(b"first")
    hashing.hash_early([str(a)])
    hashing.hash_early([str(b)])
    link = tmp_path / "link.bin"
    link.symlink_to(a)
    job = hashing.background_hash([str(link)])                  # the same file under another name
    assert job.paths == [str(a)]                                 # the early job itself
    assert job.result() == hashlib.sha256(a.read_bytes()).hexdigest()
    time.sleep(0.01)
    b.write_bytes(b"second, longer")                            # rewritten after its early hash began
    fresh = hashing.background_hash([str(b)])
    assert fresh.paths == [str(b)] and fresh.result() == hashlib.sha256(b"second, longer").hexdigest()
    assert len(hashing._EARLY) == 1                             # b's early hash, never taken
    hashing.drop_early()
    assert hashing._EARLY == []
    hashing.hash_early([str(tmp_path / "missing.bin")])         # nothing to hash: nothing started
    assert hashing._EARLY == []
