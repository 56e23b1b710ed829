"""The streaming writer: exact header bytes, in-order phases, hash while writing, nothing under the final name until done."""
import errno
import hashlib
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from quantkit import dtypes
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
    with pytest.raises(OutputError, match="disk full") as info:
        with SafetensorsWriter(str(path), specs, {}) as w:
            real = w._file

            class Full:
                def __getattr__(self, name):
                    return getattr(real, name)

                def write(self, data):
                    raise OSError(errno.ENOSPC, "No space left on device")
            w._file = Full()
            w.write(bytes(4096))
    assert str(path) in str(info.value)
    assert os.listdir(tmp_path) == []


def test_stale_temps_are_removed_live_ones_kept(tmp_path):
    final = str(tmp_path / "o.safetensors")
    dead = tmp_path / ".o.safetensors.quantkit-partial.999999999"
    live = tmp_path / f".o.safetensors.quantkit-partial.{os.getppid()}"
    dead.write_bytes(b"x")
    live.write_bytes(b"x")
    assert remove_stale_temps(final) == [str(dead)]
    assert live.exists() and not dead.exists()
