"""E4M3 codes dequantized straight into bfloat16 / float16 (fp8.dequantize_into, the runtime's CPU
path), checked bit for bit against an independent reference: ml_dtypes decodes the codes, numpy
multiplies in float32, ml_dtypes / numpy round once into the narrow type. Also: the fallbacks (128x128
blocks, E5M2, an overflowing scale, denormals flushed), the runtime's reused output buffer (never
handed out while a tensor made in it lives) and streamed reads from the file's mapped pages."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from quantkit import fp8 as F
from quantkit.fp8 import Granularity as G
from quantkit.runtime import weights as W

NARROW = {torch.bfloat16: ml_dtypes.bfloat16, torch.float16: np.float16}
ALL_CODES = np.arange(256, dtype=np.uint8).reshape(16, 16)


def reference(codes: np.ndarray, scale: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """The narrow values' bits (uint16): codes decoded by ml_dtypes, times the float32 scale in
    float32, rounded once (to nearest, ties to even) into ``dtype``."""
    values = codes.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        product = values * scale.astype(np.float32)
        return product.astype(NARROW[dtype]).view(np.uint16)


def ours(codes: np.ndarray, scale: np.ndarray, granularity: G, dtype: torch.dtype) -> np.ndarray:
    q = torch.from_numpy(codes.copy()).view(torch.float8_e4m3fn)
    return F.dequantize(q, torch.from_numpy(scale.copy()), granularity, dtype).view(torch.int16).numpy().view(np.uint16)


def same(a: np.ndarray, b: np.ndarray, dtype: torch.dtype) -> bool:
    """Equal bits, every NaN counted equal to every NaN (torch and numpy pick different NaN bits)."""
    nan = lambda x: np.isnan(x.view(NARROW[dtype]).astype(np.float32))   # noqa: E731
    return np.array_equal(nan(a), nan(b)) and np.array_equal(a[~nan(a)], b[~nan(b)])


SCALES = [1.0, 0.01, 1 / 448, 3.7e-5, 1e-8, 2.0 ** -20, 1.234567, 100.0, 250.0, 255.9, 300.0, 1e20, 1e-38, 1e-42]


@pytest.mark.parametrize("dtype", list(NARROW))
@pytest.mark.parametrize("scale", SCALES)
def test_every_code_per_tensor_is_the_reference_bit_for_bit(dtype, scale):
    """All 256 codes (both zeros, subnormals, 448, both NaNs) at scales from subnormal to past
    float32's range once multiplied by 2^120 (those take the float32 route: the same bits)."""
    s = np.array(scale, dtype=np.float32)
    assert same(ours(ALL_CODES, s, G.TENSOR, dtype), reference(ALL_CODES, s, dtype), dtype)


@pytest.mark.parametrize("dtype", list(NARROW))
def test_every_code_per_channel_is_the_reference_bit_for_bit(dtype):
    s = np.array([[v] for v in SCALES[:12]] + [[0.5], [3e-3], [7.0], [1e-30]], dtype=np.float32)
    assert same(ours(ALL_CODES, s, G.CHANNEL, dtype), reference(ALL_CODES, s, dtype), dtype)


@settings(max_examples=200, deadline=None)
@given(codes=hnp.arrays(np.uint8, st.tuples(st.integers(1, 9), st.integers(1, 40))),
       scale=st.floats(2.0 ** -140, 1e4, width=32, allow_subnormal=True), dtype=st.sampled_from(list(NARROW)),
       per_row=st.booleans(), data=st.data())
def test_any_codes_and_scales_are_the_reference_bit_for_bit(codes, scale, dtype, per_row, data):
    if per_row:
        rows = codes.shape[0]
        floats = st.floats(2.0 ** -140, 1e4, width=32, allow_subnormal=True)
        s = np.array(data.draw(st.lists(floats, min_size=rows, max_size=rows)), dtype=np.float32).reshape(rows, 1)
    else:
        s = np.array(scale, dtype=np.float32)
    assert same(ours(codes, s, G.CHANNEL if per_row else G.TENSOR, dtype), reference(codes, s, dtype), dtype)


@pytest.mark.parametrize("dtype", list(NARROW))
def test_per_row_scales_over_several_groups_of_rows_are_the_reference(dtype):
    """Per-row scales are applied a group of rows at a time (fp8.ROWS_WORK of float32 work): a weight
    of 300 rows x 4096 spans three groups, the last one short."""
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, size=(300, 4096), dtype=np.uint8)
    assert F.ROWS_WORK // 4096 < 300 < 3 * (F.ROWS_WORK // 4096)
    s = (rng.random((300, 1)) * 0.01).astype(np.float32)
    assert same(ours(codes, s, G.CHANNEL, dtype), reference(codes, s, dtype), dtype)


@pytest.mark.parametrize("granularity", [G.TENSOR, G.CHANNEL])
def test_a_convolution_kernel_keeps_its_shape(granularity):
    """A 4-D kernel is viewed as [out, in*kh*kw] (per-row scales per output channel) and comes back 4-D."""
    codes = np.random.default_rng(1).integers(0, 256, size=(8, 3, 3, 3), dtype=np.uint8)
    s = np.float32(0.02) if granularity is G.TENSOR else np.linspace(0.01, 0.05, 8, dtype=np.float32).reshape(8, 1)
    q = torch.from_numpy(codes.copy()).view(torch.float8_e4m3fn)
    got = F.dequantize(q, torch.from_numpy(np.array(s)), granularity, torch.bfloat16)
    assert got.shape == (8, 3, 3, 3)
    expected = reference(codes.reshape(8, 27), np.array(s), torch.bfloat16).reshape(8, 3, 3, 3)
    assert same(got.view(torch.int16).numpy().view(np.uint16), expected, torch.bfloat16)


def test_the_narrow_route_writes_in_place_and_declines_what_it_cannot_take():
    q = torch.from_numpy(ALL_CODES.copy()).view(torch.float8_e4m3fn)
    out = torch.empty(16, 16, dtype=torch.bfloat16)
    assert F.dequantize_narrow(q, torch.tensor(0.01), G.TENSOR, out)
    assert same(out.view(torch.int16).numpy().view(np.uint16), reference(ALL_CODES, np.float32(0.01), torch.bfloat16),
                torch.bfloat16)
    untouched = out.clone()
    assert not F.dequantize_narrow(q, torch.ones(1, 1), G.BLOCK, out)                  # 128x128 tiles
    assert not F.dequantize_narrow(q.view(torch.uint8).view(torch.float8_e5m2), torch.tensor(1.0), G.TENSOR, out)
    assert not F.dequantize_narrow(q, torch.tensor(1e30), G.TENSOR, out)              # 1e30 * 2^120 overflows
    assert torch.equal(out.view(torch.int16), untouched.view(torch.int16))


def test_flushed_denormals_take_the_float32_route_and_keep_the_subnormal_codes():
    """torch.set_flush_denormal(True) would read E4M3's subnormals, placed as bfloat16 subnormals,
    as zero: the route is declined and the values stay right."""
    s = np.float32(0.01)
    expected = reference(ALL_CODES, s, torch.bfloat16)
    q = torch.from_numpy(ALL_CODES.copy()).view(torch.float8_e4m3fn)
    torch.set_flush_denormal(True)
    try:
        if not F._denormals_flushed():
            pytest.skip("this CPU cannot flush denormals")
        out = torch.empty(16, 16, dtype=torch.bfloat16)
        assert not F.dequantize_narrow(q, torch.tensor(s), G.TENSOR, out)
        got = F.dequantize(q, torch.tensor(s), G.TENSOR, torch.bfloat16)
    finally:
        torch.set_flush_denormal(False)
    assert not F._denormals_flushed()
    assert same(got.view(torch.int16).numpy().view(np.uint16), expected, torch.bfloat16)
    assert float(got[0, 1]) != 0.0                                                # code 0x01: 2^-9 * 0.01


def test_dequantize_into_any_dtype_is_dequantize():
    q = torch.from_numpy(ALL_CODES.copy()).view(torch.float8_e4m3fn)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for g, s in ((G.TENSOR, torch.tensor(0.02)), (G.CHANNEL, torch.rand(16, 1)), (G.BLOCK, torch.rand(1, 1))):
            out = torch.full((16, 16), 7.0, dtype=dtype)
            F.dequantize_into(q, s, g, out)
            expected = (q.float() * F.expand_scale(s, 16, 16, g)).to(dtype)
            assert torch.equal(out.isnan(), expected.isnan())
            assert torch.equal(out[~out.isnan()], expected[~expected.isnan()])


def test_the_slot_is_never_handed_out_while_a_weight_made_in_it_lives():
    log = W.KernelLog()
    a = F.quantize(torch.randn(64, 32), torch.tensor(0.01))
    b = F.quantize(torch.randn(64, 32), torch.tensor(0.01))
    wa = W.dequantized(a, torch.tensor(0.01), G.TENSOR, torch.bfloat16, log)
    kept = wa.clone()
    wb = W.dequantized(b, torch.tensor(0.01), G.TENSOR, torch.bfloat16, log)     # wa still alive: a fresh buffer
    assert wb.data_ptr() != wa.data_ptr() and torch.equal(wa, kept)
    view = wa[3:5]
    ptr = wa.data_ptr()
    del wa, wb
    wc = W.dequantized(b, torch.tensor(0.01), G.TENSOR, torch.bfloat16, log)     # a view of it still alive
    assert wc.data_ptr() != ptr and torch.equal(view, kept[3:5])
    del view, wc
    wd = W.dequantized(a, torch.tensor(0.01), G.TENSOR, torch.bfloat16, log)     # nothing holds it now: reused
    assert wd.data_ptr() == ptr and torch.equal(wd, kept)


def test_a_copied_model_gets_a_slot_of_its_own():
    import copy
    import pickle
    log = W.KernelLog()
    q = F.quantize(torch.randn(8, 8), torch.tensor(0.01))
    W.dequantized(q, torch.tensor(0.01), G.TENSOR, torch.bfloat16, log)
    for other in (copy.deepcopy(log), pickle.loads(pickle.dumps(log))):
        assert other.slot is not log.slot and other.slot._buf is None and other.counts == log.counts


def test_streamed_reads_map_the_files_pages_and_read_the_same_values(tmp_path):
    """read_data(mapped=True) of a whole stored tensor is a view of the file's pages (no copy), of a
    placement joined from several tensors a copy; the values are the copied read's either way."""
    from safetensors.torch import save_file

    from quantkit.reader import SafetensorsFile
    from quantkit.runtime.placements import Piece, Placement, read_data
    path = tmp_path / "w.safetensors"
    a, b = torch.randn(6, 4).to(torch.bfloat16), torch.randn(2, 4).to(torch.bfloat16)
    save_file({"a": a, "b": b}, str(path))
    source = SafetensorsFile(str(path))
    try:
        infos = source.tensors
        whole = Placement("x", (6, 4), infos["a"].dtype, (Piece("a", 0, 6, 0),))
        joined = Placement("y", (8, 4), infos["a"].dtype, (Piece("a", 0, 6, 0), Piece("b", 0, 2, 6)))
        for p, expected in ((whole, a), (joined, torch.cat([a, b]))):
            copied, mapped = read_data(source, p), read_data(source, p, mapped=True)
            assert torch.equal(copied, expected) and torch.equal(mapped, expected)
        mapped = read_data(source, whole, mapped=True)
        assert mapped.untyped_storage().data_ptr() != read_data(source, whole).untyped_storage().data_ptr()
    finally:
        source.close()
