"""SHA256 through memory maps, and hashes fed by a reader's reads (validate's one pass).

What it proves: the mapped hash equals hashlib's over any byte range (windows that do not start
on a page, empty ranges, a file that is not a multiple of anything); ``ReadHashes`` gives every
file's true SHA256 whatever the reads do (in order, out of order, twice, skipping tensors, no read
at all, two files read alternately into one buffer), and in file order it takes every data byte
from the reads themselves (one read of the file for both the comparison and the hash).
"""
import hashlib
import os
import random

import pytest
import torch
from safetensors.torch import save_file

from quantkit.hashing import ReadHashes, sha256_file, update_from_file
from quantkit.reader import SafetensorsFile


def digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


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


@pytest.fixture
def files(tmp_path):
    g = torch.Generator().manual_seed(3)
    paths = []
    for n in range(2):
        tensors = {f"t{i}": torch.randn(64 + i, 300 + 7 * n, generator=g) for i in range(12)}
        tensors["ids"] = torch.arange(11)
        path = tmp_path / f"f{n}.safetensors"
        save_file(tensors, str(path))
        paths.append(str(path))
    return paths


def read_rows(f: SafetensorsFile, names):
    """Each tensor in 1000-byte pieces, into a fresh buffer per tensor."""
    for name in names:
        info = f.tensors[name]
        out = memoryview(bytearray(info.nbytes))
        for start in range(0, info.nbytes, 1000):
            f.read_into(info, start, out[start:start + 1000])


@pytest.mark.parametrize("order", ["file", "shuffled", "twice", "some", "none"])
def test_read_hashes_are_the_files_sha256(files, order):
    path = files[0]
    with SafetensorsFile(path) as f, ReadHashes([path]) as hashes:
        names = sorted(f.tensors, key=lambda n: f.tensors[n].start)
        if order == "shuffled":
            random.Random(0).shuffle(names)
        elif order == "twice":
            names = names + names[::-1]
        elif order == "some":
            names = names[1::3]
        elif order == "none":
            names = []
        read_rows(f, names)
        follower = hashes._followers[path]
        assert hashes.result() == digest(path)
        assert hashes.digests[path] == digest(path)
    if order == "file":      # every data byte came from the reads: one read of the file
        with SafetensorsFile(path) as f:
            assert follower.hashed_from_reads == f.file_size - 8 - f.header_size


def test_two_files_read_into_one_buffer(files):
    """A buffer refilled from the other file waits until its previous bytes were hashed."""
    buf = bytearray(1000)
    with SafetensorsFile(files[0]) as a, SafetensorsFile(files[1]) as b, ReadHashes(files) as hashes:
        order = lambda f: sorted(f.tensors, key=lambda n: f.tensors[n].start)    # noqa: E731
        for name_a, name_b in zip(order(a), order(b)):
            for f, name in ((a, name_a), (b, name_b)):
                info = f.tensors[name]
                for start in range(0, info.nbytes, len(buf)):
                    n = min(len(buf), info.nbytes - start)
                    f.read_into(info, start, memoryview(buf)[:n])
        hashes.result()
    assert hashes.digests == {p: digest(p) for p in files}


def test_eager_files_hash_without_reads(files):
    with ReadHashes(files, eager=True) as hashes:
        assert hashes.result()
    assert hashes.digests == {p: digest(p) for p in files}
