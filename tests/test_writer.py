"""The streaming writer: exact header bytes, in-order phases, hash while writing, nothing under the final name until done."""
import errno
import hashlib
try:
    import fcntl
except ImportError:
    fcntl = None
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from quantkit import dtypes, writer
from quantkit.errors import OutputError
from quantkit.writer import OutputTensor, SafetensorsWriter, encode_header, remove_stale_temps, temp_path_for


def test_header_golden_bytes():
    header = encode_header([OutputTensor("a", dtypes.F32, (2,)), OutputTensor("b", dtypes.U8, (3,))], {"format": "pt"})
    body = b'{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},' \
           b'"b":{"dtype":"U8","shape":[3],"data_offsets":[8,11]}}'
    body += b" " * (-len(body) % 8)
    assert header == len(body).to_bytes(8, "little") + body
    assert len(header) % 8 == 0


def _write(path, tensors: dict, metadata=None, **kw):
    specs = [OutputTensor(k, dtypes.from_torch(v.dtype), tuple(v.shape)) for k, v in tensors.items()]
    with SafetensorsWriter(str(path), specs, metadata or {}, **kw) as w:
        for v in tensors.values():
            raw = v.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            for i in range(0, len(raw), 7):          # odd piece sizes
                w.write(raw[i:i + 7])
        return w.finish()


def test_roundtrip_through_safetensors(tmp_path):
    tensors = {"w": torch.randn(5, 3), "q": torch.randn(4, 4).to(torch.float8_e4m3fn), "i": torch.arange(3),
               "empty": torch.zeros(0, 2), "s": torch.tensor(2.5), "b": torch.randn(3, dtype=torch.bfloat16)}
    path = tmp_path / "o.safetensors"
    digest = _write(path, tensors, {"k": "v"})
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = load_file(str(path))
    for k, v in tensors.items():
        raw = lambda t: t.contiguous().reshape(-1).view(torch.uint8).tolist()
        assert loaded[k].dtype == v.dtype and loaded[k].shape == v.shape and raw(loaded[k]) == raw(v), k
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"k": "v"}


def test_phases_are_checked(tmp_path):
    specs = [OutputTensor("a", dtypes.F32, (2,)), OutputTensor("b", dtypes.F32, (1,))]
    path = tmp_path / "o.safetensors"
    with SafetensorsWriter(str(path), specs, {}) as w:
        with pytest.raises(ValueError, match="remain"):
            w.write(bytes(12))                       # crosses into the next tensor
        w.write(bytes(8))
        with pytest.raises(ValueError, match="before all tensors"):
            w.finish()
        assert not path.exists()
    assert not path.exists() and os.listdir(tmp_path) == []


def test_exception_leaves_nothing(tmp_path):
    path = tmp_path / "o.safetensors"
    with pytest.raises(RuntimeError):
        with SafetensorsWriter(str(path), [OutputTensor("a", dtypes.F32, (4,))], {}) as w:
            w.write(bytes(8))
            assert os.path.exists(temp_path_for(str(path)))
            raise RuntimeError("killed")
    assert os.listdir(tmp_path) == []


def test_existing_destination_needs_overwrite(tmp_path):
    path = tmp_path / "o.safetensors"
    path.write_bytes(b"keep me")
    with pytest.raises(OutputError, match="--overwrite"):
        _write(path, {"a": torch.zeros(1)})
    assert path.read_bytes() == b"keep me"
    _write(path, {"a": torch.zeros(1)}, overwrite=True)
    assert torch.equal(load_file(str(path))["a"], torch.zeros(1))


def test_disk_full_is_one_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "o.safetensors"
    specs = [OutputTensor("a", dtypes.F32, (1024,))]

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OutputError, match="disk full") as info:
        with SafetensorsWriter(str(path), specs, {}) as w:
            monkeypatch.setattr(writer.os, "write", full)
            w.write(bytes(4096))
            w.finish()
    assert str(path) in str(info.value)
    assert os.listdir(tmp_path) == []


def test_disk_full_mid_stream_stops_the_caller(tmp_path, monkeypatch):
    """A write failing on the writer's thread reaches the caller at its next hand-over, not at the end."""
    path = tmp_path / "o.safetensors"
    n = 6 * writer._Sink.BUFFER_BYTES
    real, calls = os.write, []

    def fails_second(fd, data):
        calls.append(len(data))
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)
    monkeypatch.setattr(writer.os, "write", fails_second)
    with pytest.raises(OutputError, match="disk full"):
        with SafetensorsWriter(str(path), [OutputTensor("a", dtypes.U8, (n,))], {}) as w:
            piece = bytes(1 << 20)
            for _ in range(n // len(piece)):
                w.write(piece)
            w.finish()
    assert len(calls) <= writer._Sink.BUFFERS + 1        # it stopped early: the buffers bound the run-on
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("direct", [True, False])
def test_many_buffers_reserved_and_copied_pieces(tmp_path, monkeypatch, direct):
    """Several buffers' worth, in odd pieces, some computed in place (``reserve``), across buffer
    ends and O_DIRECT's alignment: the bytes and the SHA256 are exactly those of the pieces, and
    the file has its exact size (the padding of the last direct write is cut)."""
    if not direct:
        monkeypatch.setattr(writer, "_O_DIRECT", 0)
    rng = np.random.default_rng(0)
    sizes = [int(s) for s in rng.integers(1, 3 << 20, 20)] + [4096, 1, 4095, 12345]
    data = rng.integers(0, 256, sum(sizes), dtype=np.uint8)
    path = tmp_path / "o.safetensors"
    with SafetensorsWriter(str(path), [OutputTensor("x", dtypes.U8, (len(data),))], {"k": "v"}) as w:
        pos = 0
        for i, n in enumerate(sizes):
            piece = data[pos:pos + n]
            space = w.reserve(n) if i % 2 else None
            if space is None:
                w.write(piece)
            else:
                np.frombuffer(space, dtype=np.uint8)[:] = piece
                w.commit(n)
            pos += n
        if not direct:
            assert not w._sink._direct
        digest = w.finish()
    raw = path.read_bytes()
    assert digest == hashlib.sha256(raw).hexdigest()
    assert len(raw) == len(encode_header([OutputTensor("x", dtypes.U8, (len(data),))], {"k": "v"})) + len(data)
    assert np.array_equal(load_file(str(path))["x"].numpy(), data)


def test_direct_io_refused_at_write_falls_back(tmp_path, monkeypatch):
    """A filesystem that takes O_DIRECT at open but refuses a write (EINVAL): the same bytes go
    through ordinary writes."""
    real, refused = os.write, []

    def picky(fd, data):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & writer._O_DIRECT:
            refused.append(len(data))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data)
    monkeypatch.setattr(writer.os, "write", picky)
    path = tmp_path / "o.safetensors"
    tensors = {"w": torch.randn(3000, 1000)}
    digest = _write(path, tensors)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert torch.equal(load_file(str(path))["w"], tensors["w"])
    if writer._O_DIRECT:
        assert refused, "O_DIRECT was never tried"


def test_reserve_checks_the_phases(tmp_path):
    path = tmp_path / "o.safetensors"
    with SafetensorsWriter(str(path), [OutputTensor("a", dtypes.U8, (4,))], {}) as w:
        with pytest.raises(ValueError, match="remain"):
            w.reserve(5)
        w.reserve(4)[:] = b"abcd"
        w.commit(4)
        with pytest.raises(ValueError, match="after the last tensor"):
            w.commit(1)
        w.finish()
    assert load_file(str(path))["a"].numpy().tobytes() == b"abcd"
    big = SafetensorsWriter.RESERVE_BYTES + 1
    with SafetensorsWriter(str(tmp_path / "b.safetensors"), [OutputTensor("a", dtypes.U8, (big,))], {}) as w:
        assert w.reserve(big) is None        # over the limit: the caller writes it instead
        w.write(bytes(big))
        w.finish()


def test_stale_temps_are_removed_live_ones_kept(tmp_path):
    final = str(tmp_path / "o.safetensors")
    dead = tmp_path / ".o.safetensors.quantkit-partial.999999999"
    live = tmp_path / f".o.safetensors.quantkit-partial.{os.getppid()}"
    dead.write_bytes(b"x")
    live.write_bytes(b"x")
    assert remove_stale_temps(final) == [str(dead)]
    assert live.exists() and not dead.exists()
