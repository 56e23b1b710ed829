"""The reader refuses every malformed or hostile header with one QuantkitError line, and reads good files exactly."""
import os
import struct

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, strategies as st
from safetensors.torch import save_file

from quantkit.cli import main
from quantkit.errors import HeaderError, QuantkitError
from quantkit.reader import SafetensorsFile

from hostile import ATTACKS, build_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("hostile"))


def test_corpus_is_large_enough():
    assert len(ATTACKS) >= 25


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_reader_refuses(corpus, attack):
    with pytest.raises(QuantkitError) as info:
        SafetensorsFile(corpus[attack])
    message = str(info.value)
    assert corpus[attack] in message and "\n" not in message


@pytest.mark.parametrize("attack", sorted(ATTACKS))
@pytest.mark.parametrize("command", ["convert", "plan", "validate"])
def test_cli_refuses_with_exit_2_and_no_output(corpus, attack, command, tmp_path):
    src = corpus[attack]
    before = open(src, "rb").read()
    out = tmp_path / "out.safetensors"
    args = {"convert": ["convert", src, str(out)], "plan": ["plan", src],
            "validate": ["validate", str(out), "--against", src, "--no-hash-check"]}[command]
    if command == "validate":
        _good_output(out)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    lines = [l for l in result.output.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and src in lines[0]
    assert "Traceback" not in result.output
    if command == "convert":
        assert not out.exists()
        assert os.listdir(tmp_path) == []
    assert open(src, "rb").read() == before


def _good_output(path):
    save_file({"x": torch.zeros(2)}, str(path))


def test_truncated_file_names_the_problem(corpus):
    with pytest.raises(HeaderError, match="truncated"):
        SafetensorsFile(corpus["offsets_past_end"])


def test_reads_what_safetensors_wrote(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(2, dtype=torch.bfloat16),
               "empty": torch.zeros(0, 4), "scalar": torch.tensor(3.5)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    with SafetensorsFile(path) as f:
        assert f.metadata == {"format": "pt"}
        for name, t in tensors.items():
            got = torch.cat([x.reshape(-1).clone() for _, _, x in f.iter_rows(f.tensors[name], 8)]) if t.numel() else t
            assert torch.equal(got.reshape(t.shape), t), name


def test_mapped_chunks_private_and_unmappable_files_read(tmp_path, monkeypatch):
    """Chunks come from private maps of the file: writing into one never reaches the file; a file
    the system cannot map (some FUSE filesystems) is read with preadv instead, the same bytes."""
    from quantkit import reader
    t = torch.randn(64, 33)
    path = tmp_path / "m.safetensors"
    save_file({"t": t}, str(path))
    before = path.read_bytes()
    with SafetensorsFile(path) as f:
        for _, _, x in f.iter_rows(f.tensors["t"], 1000):
            x.fill_(7.0)                              # copy-on-write: this process's page only
    assert path.read_bytes() == before

    def refuse(*a, **k):
        raise OSError(19, "No such device")
    monkeypatch.setattr(reader.mmap, "mmap", refuse)
    with SafetensorsFile(path) as f:
        got = torch.cat([x.clone() for _, _, x in f.iter_rows(f.tensors["t"], 1000)])
        assert f._mappable is False
    assert torch.equal(got, t)


@given(rows=st.integers(1, 300), cols=st.integers(1, 40), chunk=st.integers(1, 4096), align=st.sampled_from([1, 128]))
def test_iter_rows_covers_every_row_once(tmp_path_factory, rows, cols, chunk, align):
    t = torch.arange(rows * cols, dtype=torch.float32).reshape(rows, cols)
    path = tmp_path_factory.mktemp("rows") / "m.safetensors"
    save_file({"t": t}, str(path))
    with SafetensorsFile(path) as f:
        parts = [(r0, x.clone()) for r0, _, x in f.iter_rows(f.tensors["t"], chunk, align)]  # chunks reuse one buffer
        assert all((r0 % align) == 0 for r0, _ in parts)
        assert torch.equal(torch.cat([x for _, x in parts]), t)


@given(st.binary(min_size=0, max_size=300))
def test_fuzz_header_bytes_only_quantkit_errors(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("fuzz") / "f.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob)
    try:
        SafetensorsFile(path).close()
    except QuantkitError:
        pass


@given(start=st.integers(-5, 40), end=st.integers(-5, 40), dims=st.lists(st.integers(-2, 6), max_size=3),
       dtype=st.sampled_from(["F32", "BF16", "I8", "F8_E4M3", "X1"]), data=st.integers(0, 40))
def test_fuzz_offsets_and_shapes_only_quantkit_errors(tmp_path_factory, start, end, dims, dtype, data):
    import json
    header = json.dumps({"t": {"dtype": dtype, "shape": dims, "data_offsets": [start, end]}}).encode()
    path = tmp_path_factory.mktemp("fuzz") / "f.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(data))
    try:
        with SafetensorsFile(path) as f:
            info = f.tensors["t"]
            assert info.end <= f.file_size and info.nbytes == max(0, end - start)
    except QuantkitError:
        pass
