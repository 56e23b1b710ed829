"""Formats ``comfy`` and ``comfy-legacy``, checked the way ComfyUI reads them.

A FLUX checkpoint with ComfyUI/BFL key names is converted through the CLI; the outputs are read
back with the real clients (safetensors, comfy-kitchen's ``QuantizedTensor``) and a few lines that
restate what ComfyUI's loader does with a state dict (``comfy/utils.py`` ``convert_old_quants`` and
``detect_layer_quantization``, ``comfy/ops.py`` mixed-precision ``Linear``), so each test says what
a ComfyUI installation would do with the file.
"""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import tiny_models
from quantkit.formats import detect_format
from quantkit.reader import SafetensorsFile
from quantkit.readback import load_dequantized
from runs import run

ck = pytest.importorskip("comfy_kitchen.tensor")
QuantizedTensor, TensorCoreFP8Layout = ck.QuantizedTensor, ck.TensorCoreFP8Layout

H = 64
E4M3_MARKER = b'{"format":"float8_e4m3fn","full_precision_matrix_mult":true}'
# Pin the policy (the format is under test, not the policy): everything kept, then these quantized.
RULES = ("--preset", "generic", "--keep", "*", "--quantize", "double_blocks.*_mlp.*", "--quantize", "*_mod.lin",
         "--quantize", "single_blocks.*.linear1", "--quantize", "single_blocks.*.modulation.lin",
         "--quantize", "final_layer.*")
QUANTIZED = {"double_blocks.0.img_mlp.0", "double_blocks.0.img_mlp.2", "double_blocks.0.txt_mlp.0",
             "double_blocks.0.txt_mlp.2", "double_blocks.0.img_mod.lin", "double_blocks.0.txt_mod.lin",
             "single_blocks.0.linear1", "single_blocks.0.modulation.lin", "final_layer.adaLN_modulation.1",
             "final_layer.linear"}
# Linears the policy above keeps (a scaled_fp8 loader would force them to FP8).
KEPT_LINEARS = {"double_blocks.0.img_attn.qkv", "double_blocks.0.img_attn.proj", "double_blocks.0.txt_attn.qkv",
                "double_blocks.0.txt_attn.proj", "single_blocks.0.linear2", "img_in", "txt_in",
                "time_in.in_layer", "time_in.out_layer"}


# ----------------------------------------------------------------------------- ComfyUI, restated

# comfy/quant_ops.py QUANT_ALGOS: storage dtype and comfy-kitchen layout of each FP8 format. ComfyUI
# registers the two layout names as subclasses of comfy-kitchen's TensorCoreFP8Layout that only
# change how activations are quantized; dequantization is comfy-kitchen's.
QUANT_ALGOS = {"float8_e4m3fn": (torch.float8_e4m3fn, "TensorCoreFP8E4M3Layout"),
               "float8_e5m2": (torch.float8_e5m2, "TensorCoreFP8E5M2Layout")}
for _name in ("TensorCoreFP8E4M3Layout", "TensorCoreFP8E5M2Layout"):
    try:
        ck.get_layout_class(_name)
    except KeyError:
        ck.register_layout_class(_name, type(_name, (TensorCoreFP8Layout,), {}))


def comfy_convert_old_quants(sd, prefix="", metadata=None):
    """comfy.utils.convert_old_quants: header layers win; else a {prefix}scaled_fp8 marker turns
    scale_weight into weight_scale (+ a float8_e4m3fn marker) and scale_input into input_scale
    (dropped when 1.0); both end as <L>.comfy_quant tensors."""
    sd = dict(sd)
    if metadata and "_quantization_metadata" in metadata:
        layers = json.loads(metadata["_quantization_metadata"])["layers"]
    elif prefix + "scaled_fp8" in sd:
        full_precision = sd.pop(prefix + "scaled_fp8").numel() == 2
        layers = {}
        for key in [k for k in sd if k.startswith(prefix)]:
            if key.endswith(".scale_weight"):
                layer = key[: -len(".scale_weight")]
                sd[layer + ".weight_scale"] = sd.pop(key)
                layers[layer] = {"format": "float8_e4m3fn", **({"full_precision_matrix_mult": True}
                                                               if full_precision else {})}
            elif key.endswith(".scale_input"):
                value = sd.pop(key)
                if value.item() != 1.0:
                    sd[key[: -len(".scale_input")] + ".input_scale"] = value
    else:
        return sd
    for layer, conf in layers.items():
        sd[layer + ".comfy_quant"] = torch.tensor(list(json.dumps(conf).encode()), dtype=torch.uint8)
    return sd


def comfy_detect_layer_quantization(sd, prefix=""):
    """comfy.utils.detect_layer_quantization: one .comfy_quant key under the prefix -> mixed ops."""
    return {"mixed_ops": True} if any(k.startswith(prefix) and k.endswith(".comfy_quant") for k in sd) else None


def comfy_mixed_ops_load(sd, compute_dtype):
    """Every Linear of ComfyUI's mixed-precision ops loading its weight: a marked layer becomes a
    comfy-kitchen QuantizedTensor(weight, Params(scale=weight_scale)), an unmarked one is cast to the
    compute dtype. Returns (weights, layer configs, input scales, keys left for the other modules)."""
    sd = dict(sd)
    weights, configs, input_scales = {}, {}, {}
    for key in [k for k in sd if k.endswith(".weight")]:
        layer, w = key[: -len(".weight")], sd.pop(key)
        raw = sd.pop(layer + ".comfy_quant", None)
        if raw is None:
            weights[key] = w.to(compute_dtype)
            continue
        configs[layer] = conf = json.loads(raw.numpy().tobytes())
        storage, layout = QUANT_ALGOS[conf["format"]]
        params = ck.get_layout_class(layout).Params(scale=sd.pop(layer + ".weight_scale"), orig_dtype=compute_dtype,
                                                    orig_shape=tuple(w.shape))
        weights[key] = QuantizedTensor(w.to(storage), layout, params)
        if layer + ".input_scale" in sd:
            input_scales[layer] = sd.pop(layer + ".input_scale")
    return weights, configs, input_scales, sd


# ----------------------------------------------------------------------------- helpers


def header(path):
    """The raw safetensors header: {key: (dtype string, shape)}, metadata."""
    with open(path, "rb") as f:
        doc = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    meta = doc.pop("__metadata__", {})
    return {k: (v["dtype"], v["shape"]) for k, v in doc.items()}, meta


def flux_state_dict(prefix=""):
    """A small FLUX.1 transformer with ComfyUI/BFL key names (random bf16, one all-zero weight)."""
    g = torch.Generator().manual_seed(0)
    sd = {}

    def linear(name, out, inp, std=0.05):
        sd[f"{prefix}{name}.weight"] = (torch.randn(out, inp, generator=g) * std).bfloat16()
        sd[f"{prefix}{name}.bias"] = (torch.randn(out, generator=g) * 0.01).bfloat16()

    linear("img_in", H, 16)
    linear("txt_in", H, 32)
    linear("time_in.in_layer", H, 32)
    linear("time_in.out_layer", H, H)
    for s in ("img", "txt"):
        b = f"double_blocks.0.{s}_"
        linear(b + "mod.lin", 6 * H, H)
        linear(b + "attn.qkv", 3 * H, H)
        linear(b + "attn.proj", H, H)
        linear(b + "mlp.0", 4 * H, H)
        linear(b + "mlp.2", H, 4 * H, std=0.5)
        for n in ("query_norm", "key_norm"):
            sd[f"{prefix}{b}attn.norm.{n}.scale"] = torch.ones(16, dtype=torch.bfloat16)
    linear("single_blocks.0.linear1", 3 * H + 4 * H, H)
    linear("single_blocks.0.linear2", H, H + 4 * H)
    linear("single_blocks.0.modulation.lin", 3 * H, H)
    for n in ("query_norm", "key_norm"):
        sd[f"{prefix}single_blocks.0.norm.{n}.scale"] = torch.ones(16, dtype=torch.bfloat16)
    linear("final_layer.adaLN_modulation.1", 2 * H, H)
    sd[f"{prefix}final_layer.adaLN_modulation.1.weight"].zero_()
    linear("final_layer.linear", 16, H)
    return sd


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("comfy")


@pytest.fixture(scope="module")
def src(work):
    path = work / "flux1-tiny.safetensors"
    save_file(flux_state_dict(), str(path))
    return path


def convert(src, dst, *args):
    result = run("convert", src, dst, *RULES, *args, "--overwrite", "-q")
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def comfy(src, work):
    convert(src, work / "comfy.safetensors", "--format", "comfy")
    return work / "comfy.safetensors"


@pytest.fixture(scope="module")
def comfy_header(src, work):
    convert(src, work / "comfy-header.safetensors", "--format", "comfy", "--comfy-header-metadata")
    return work / "comfy-header.safetensors"


@pytest.fixture(scope="module")
def comfy_e5m2(src, work):
    convert(src, work / "comfy-e5m2.safetensors", "--format", "comfy", "--fp8-dtype", "float8_e5m2")
    return work / "comfy-e5m2.safetensors"


@pytest.fixture(scope="module")
def legacy(src, work):
    result = convert(src, work / "legacy.safetensors", "--format", "comfy-legacy")
    return work / "legacy.safetensors", result


def expected_keys(src, marker: bytes, input_scales: bool = False) -> dict:
    """The comfy output's header ({key: (dtype, shape)}) for the source ``src`` under RULES."""
    source, _ = header(src)
    expected = {}
    for key, (dtype, shape) in source.items():
        layer = key[: -len(".weight")]
        if key.endswith(".weight") and layer in QUANTIZED:
            expected[key] = ("F8_E4M3", shape)
            expected[layer + ".weight_scale"] = ("F32", [])
            if input_scales:
                expected[layer + ".input_scale"] = ("F32", [])
            expected[layer + ".comfy_quant"] = ("U8", [len(marker)])
        else:
            expected[key] = (dtype, shape)               # kept: BF16, same key, no marker, no scale
    return expected


def assert_bit_exact(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


# ----------------------------------------------------------------------------- format comfy

def test_comfy_keys_dtypes_and_shapes_to_the_letter(src, comfy):
    out, meta = header(comfy)
    assert out == expected_keys(src, E4M3_MARKER)
    sd = load_file(str(comfy))
    for layer in QUANTIZED:
        assert sd[layer + ".comfy_quant"].numpy().tobytes() == E4M3_MARKER
        assert json.loads(sd[layer + ".comfy_quant"].numpy().tobytes()) == {
            "format": "float8_e4m3fn", "full_precision_matrix_mult": True}
    assert not any(k.endswith((".input_scale", ".scale_weight")) or "scaled_fp8" in k for k in out)
    assert "_quantization_metadata" not in meta
    assert meta["quantkit.format"] == "comfy" and meta["quantkit.source"] == src.name
    assert "quantkit.source_sha256" not in meta and json.loads(meta["quantkit.policy"])["rules"]
    assert set(json.loads(meta["quantkit.quantized"])) == QUANTIZED


def test_comfyui_loads_every_quantized_layer_through_comfy_kitchen_bit_exact(src, comfy):
    sd = load_file(str(comfy))
    assert comfy_detect_layer_quantization(sd) == {"mixed_ops": True}      # ComfyUI switches to mixed ops
    ours = load_dequantized(str(comfy))
    source = load_file(str(src))
    weights, configs, input_scales, rest = comfy_mixed_ops_load(sd, torch.float32)
    assert set(configs) == QUANTIZED and not input_scales
    assert all(c == {"format": "float8_e4m3fn", "full_precision_matrix_mult": True} for c in configs.values())
    # Nothing left that a ComfyUI module would not expect: biases and norm scales only.
    assert all(k.endswith((".bias", "_norm.scale")) for k in rest)
    x = torch.randn(3, 5 * H, generator=torch.Generator().manual_seed(1))
    for key, w in weights.items():
        layer = key[: -len(".weight")]
        if layer not in QUANTIZED:
            assert not isinstance(w, QuantizedTensor) and torch.equal(w, source[key].float())
            continue
        assert isinstance(w, QuantizedTensor) and w._qdata.dtype == torch.float8_e4m3fn
        assert_bit_exact(w.dequantize(), ours[key])
        # The forward runs on CPU through comfy-kitchen's linear handler (it dequantizes, as ComfyUI
        # does with full_precision_matrix_mult); equal up to float32 summation order.
        xi, bias = x[:, : w.shape[1]], source[layer + ".bias"].float()
        torch.testing.assert_close(F.linear(xi, w, bias), F.linear(xi, ours[key], bias), rtol=1e-5, atol=1e-5)


def test_comfyui_bf16_compute_rounds_the_scale_once_more(comfy):
    """ComfyUI's usual compute dtype is bf16: comfy-kitchen casts q and the scale to bf16 before
    multiplying, so its weights are within two bf16 roundings (2^-7 relative) of W = q * scale."""
    weights, _, _, _ = comfy_mixed_ops_load(load_file(str(comfy)), torch.bfloat16)
    ours = load_dequantized(str(comfy))
    for layer in QUANTIZED:
        w, ref = weights[layer + ".weight"].dequantize(), ours[layer + ".weight"]
        assert w.dtype == torch.bfloat16
        assert bool(((w.float() - ref).abs() <= ref.abs() * 2.0 ** -7).all())


def test_header_metadata_only_with_the_flag_and_names_equal_key_stems(comfy_header):
    out, meta = header(comfy_header)
    doc = json.loads(meta["_quantization_metadata"])
    stems = {k[: -len(".comfy_quant")] for k in out if k.endswith(".comfy_quant")}
    assert doc["format_version"] == "1.0" and set(doc["layers"]) == stems == QUANTIZED
    sd = load_file(str(comfy_header))
    for layer, conf in doc["layers"].items():
        assert conf == json.loads(sd[layer + ".comfy_quant"].numpy().tobytes())
        assert layer + ".weight" in out and layer + ".weight_scale" in out
    # ComfyUI gives the header precedence and rebuilds the same markers from it.
    rebuilt = comfy_convert_old_quants(sd, "", meta)
    assert {k for k in rebuilt if k.endswith(".comfy_quant")} == {s + ".comfy_quant" for s in stems}


def test_header_only_transport_is_read_back(src, comfy_header, work):
    """A file whose layer configs live only in the header (no marker tensors, no quantkit metadata)."""
    sd = {k: v for k, v in load_file(str(comfy_header)).items() if not k.endswith(".comfy_quant")}
    with SafetensorsFile(comfy_header) as f:
        meta = {"_quantization_metadata": f.metadata["_quantization_metadata"]}
    path = work / "header-only.safetensors"
    save_file(sd, str(path), metadata=meta)
    with SafetensorsFile(path) as f:
        assert detect_format(f).name == "comfy"
        stored = detect_format(f).stored(f)
    assert {s.source_key for s in stored.values() if s.scale_key} == {f"{layer}.weight" for layer in QUANTIZED}
    ours = load_dequantized(str(comfy_header))
    for key, t in load_dequantized(str(path)).items():
        assert_bit_exact(t, ours[key])
    result = run("validate", path, "--against", src, "--no-hash-check", "--min-sqnr", 25)
    assert result.exit_code == 0, result.output
    weights, configs, _, _ = comfy_mixed_ops_load(comfy_convert_old_quants(sd, "", meta), torch.float32)
    assert set(configs) == QUANTIZED


def test_third_party_markers_with_extra_keys_are_read(comfy, work):
    """convert-to-quant style: default json.dumps spacing, an extra 'orig_dtype' key, no quantkit metadata."""
    sd = load_file(str(comfy))
    for layer in QUANTIZED:
        conf = {"format": "float8_e4m3fn", "orig_dtype": "torch.bfloat16"}
        sd[layer + ".comfy_quant"] = torch.tensor(list(json.dumps(conf).encode()), dtype=torch.uint8)
    path = work / "third-party.safetensors"
    save_file(sd, str(path))
    ours = load_dequantized(str(comfy))
    theirs = load_dequantized(str(path))
    assert theirs.keys() == ours.keys()
    for key in ours:
        assert_bit_exact(theirs[key], ours[key])


def test_e5m2_variant(src, comfy_e5m2):
    out, _ = header(comfy_e5m2)
    sd = load_file(str(comfy_e5m2))
    ours = load_dequantized(str(comfy_e5m2))
    for layer in QUANTIZED:
        assert out[layer + ".weight"][0] == "F8_E5M2" and out[layer + ".weight_scale"] == ("F32", [])
        assert sd[layer + ".comfy_quant"].numpy().tobytes() == \
            b'{"format":"float8_e5m2","full_precision_matrix_mult":true}'
    weights, configs, _, _ = comfy_mixed_ops_load(sd, torch.float32)
    assert set(configs) == QUANTIZED
    for layer in QUANTIZED:
        w = weights[layer + ".weight"]
        assert w._layout_cls == "TensorCoreFP8E5M2Layout" and w._qdata.dtype == torch.float8_e5m2
        assert_bit_exact(w.dequantize(), ours[layer + ".weight"])
    result = run("validate", comfy_e5m2, "--against", src, "--min-sqnr", 15)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("fmt", ["comfy", "comfy-legacy"])
@pytest.mark.parametrize("granularity", ["channel", "block"])
def test_only_per_tensor_scales(src, work, fmt, granularity):
    result = run("convert", src, work / "refused.safetensors", "--format", fmt, "--granularity", granularity)
    assert result.exit_code == 2
    assert f"does not support --granularity {granularity}" in result.output and "tensor" in result.output
    assert not (work / "refused.safetensors").exists()


def test_legacy_refuses_e5m2(src, work):
    result = run("convert", src, work / "refused.safetensors", "--format", "comfy-legacy",
                 "--fp8-dtype", "float8_e5m2")
    assert result.exit_code == 2 and "--format comfy" in result.output


@pytest.mark.parametrize("fmt", ["comfy", "comfy-legacy"])
def test_only_2d_weights_become_fp8(work, fmt):
    """ComfyUI's mixed ops hold FP8 only in Linear/Embedding layers: a quantized conv would not load."""
    path = work / "conv.safetensors"
    save_file({"blocks.0.conv.weight": torch.randn(8, 4, 3, 3).bfloat16(),
               "blocks.0.ff.weight": torch.randn(16, 8).bfloat16()}, str(path))
    result = run("convert", path, work / "conv-fp8.safetensors", "--format", fmt, "--quantize-conv")
    assert result.exit_code == 2 and "blocks.0.conv.weight" in result.output and "2-D" in result.output


@pytest.mark.parametrize("fmt", ["comfy", "comfy-legacy"])
@pytest.mark.parametrize("model, what", [("flux_controlnet", "a diffusers FLUX ControlNet")])
def test_diffusers_names_that_comfyui_renames_are_refused(work, fmt, model, what):
    """ComfyUI renames these on load through maps that carry .weight/.bias only: the scales and
    markers would be dropped and the FP8 codes loaded as weights. Refused before anything is written.
    (Diffusers FLUX.1 and SD3 transformers and UNets are written under BFL's / SAI's / LDM's names
    instead: test_comfy_names.py; FLUX.2, Chroma, Wan and the other families: test_diffusers_families.py.)"""
    src, out = work / f"{model}.safetensors", work / f"{model}-{fmt}.safetensors"
    tiny_models.save_state_dict(tiny_models.build(model), src)
    for command in (["plan", src, "--format", fmt], ["convert", src, out, "--format", fmt]):
        result = run(*command)
        assert result.exit_code == 2, result.output
        assert what in result.output and "drops the FP8 scales" in result.output and "--format native" in result.output
    assert not out.exists() and not list(work.glob(f"{model}-{fmt}*"))
    assert run("convert", src, out, "--format", fmt, "--keep", "*").exit_code == 0     # nothing FP8: nothing lost


@pytest.mark.parametrize("model", ["qwen_image", "clip_text", "t5_encoder"])
def test_models_comfyui_loads_under_diffusers_or_transformers_names_are_converted(work, model):
    """ComfyUI's own names for these are the diffusers / transformers ones: nothing is renamed."""
    src, out = work / f"{model}.safetensors", work / f"{model}-comfy.safetensors"
    tiny_models.save_state_dict(tiny_models.build(model), src)
    result = run("convert", src, out, "--format", "comfy")
    assert result.exit_code == 0, result.output
    assert any(k.endswith(".comfy_quant") for k in load_file(str(out)))


@pytest.mark.parametrize("name", ["comfy", "comfy_header", "legacy"])
def test_validate_passes(request, src, name):
    out = request.getfixturevalue(name)
    out = out[0] if isinstance(out, tuple) else out
    result = run("validate", out, "--against", src, "--min-sqnr", 25)
    assert result.exit_code == 0, result.output
    assert f"tensors compared: {len(header(src)[0])} ({len(QUANTIZED)} FP8)" in result.output


@pytest.mark.parametrize("conf, error", [
    ({"format": "float8_e5m2", "full_precision_matrix_mult": True}, "marker says float8_e5m2"),
    ({"format": "nvfp4"}, "is not FP8"),
])
def test_inconsistent_markers_fail_validation(src, comfy, work, conf, error):
    sd = load_file(str(comfy))
    sd["final_layer.linear.comfy_quant"] = torch.tensor(list(json.dumps(conf).encode()), dtype=torch.uint8)
    path = work / "bad.safetensors"
    save_file(sd, str(path))
    result = run("validate", path, "--against", src, "--no-hash-check")
    assert result.exit_code == 1 and error in result.output


# ----------------------------------------------------------------------------- format comfy-legacy

def test_legacy_keys_dtypes_and_shapes_to_the_letter(src, legacy):
    path, _ = legacy
    source, _ = header(src)
    out, meta = header(path)
    expected = {"scaled_fp8": ("F8_E4M3", [0])}
    for key, (dtype, shape) in source.items():
        layer = key[: -len(".weight")]
        if key.endswith(".weight") and layer in QUANTIZED:
            expected[key] = ("F8_E4M3", shape)
            expected[layer + ".scale_weight"] = ("F32", [])
        else:
            expected[key] = (dtype, shape)
    assert out == expected
    assert meta["quantkit.format"] == "comfy-legacy" and "_quantization_metadata" not in meta


def test_legacy_warns_about_kept_linears(legacy, src, work):
    _, result = legacy
    warning = next(line for line in result.stderr.splitlines() if "comfy-legacy" in line)
    assert f"{len(KEPT_LINEARS)} linear weight(s) stay in high precision" in warning
    assert "double_blocks.0.img_attn" in warning and "--format comfy" in warning
    # Everything 2-D quantized: nothing for an old loader to force, no warning.
    result = run("convert", src, work / "all.safetensors", "--format", "comfy-legacy", "--preset", "generic",
                 "--quantize", "*", "--overwrite", "-q")
    assert result.exit_code == 0 and "comfy-legacy" not in result.stderr


def test_comfyui_loads_legacy_output_like_the_comfy_one(legacy, comfy):
    path, _ = legacy
    sd = load_file(str(path))
    # Old loaders: the marker's dtype is the dtype of every Linear weight, each with its scale_weight.
    assert sd["scaled_fp8"].dtype == torch.float8_e4m3fn and sd["scaled_fp8"].numel() == 0
    assert {k[: -len(".scale_weight")] for k in sd if k.endswith(".scale_weight")} == QUANTIZED
    # Current ComfyUI: convert_old_quants, then mixed ops; no full_precision_matrix_mult (0-element marker).
    converted = comfy_convert_old_quants(sd)
    assert comfy_detect_layer_quantization(converted) == {"mixed_ops": True}
    weights, configs, _, rest = comfy_mixed_ops_load(converted, torch.float32)
    assert configs == {layer: {"format": "float8_e4m3fn"} for layer in QUANTIZED}
    assert all(k.endswith((".bias", "_norm.scale")) for k in rest)
    ours = load_dequantized(str(comfy))     # the same source: identical codes and scales
    for key, w in weights.items():
        ref = ours[key]
        assert_bit_exact(w.dequantize() if isinstance(w, QuantizedTensor) else w, ref.float())


@pytest.mark.parametrize("source_name, target, scale_suffix", [
    ("legacy", "comfy", ".weight_scale"),
    ("legacy", "native", ".weight_scale"),
    ("comfy", "comfy-legacy", ".scale_weight"),
    ("comfy_header", "native", ".weight_scale"),
])
def test_conversion_between_conventions_keeps_fp8_bytes(request, work, source_name, target, scale_suffix):
    source = request.getfixturevalue(source_name)
    source = source[0] if isinstance(source, tuple) else source
    out = work / f"{source_name}-to-{target}.safetensors"
    # --keep '*' keeps every tensor in high precision (without it the policy would quantize the
    # source's high-precision linears afresh); the FP8 layers, named by --quantize after it, are
    # carried over (a --keep naming an FP8 layer dequantizes it).
    carry = [arg for layer in sorted(QUANTIZED) for arg in ("--quantize", layer)]
    result = run("convert", source, out, "--format", target, "--keep", "*", *carry, "--overwrite", "-q")
    assert result.exit_code == 0, result.output
    assert "already quantized" in result.output
    a, b = load_file(str(source)), load_file(str(out))
    source_scale = ".scale_weight" if source_name == "legacy" else ".weight_scale"
    for layer in QUANTIZED:
        assert_bit_exact(b[layer + ".weight"], a[layer + ".weight"])
        assert_bit_exact(b[layer + scale_suffix], a[layer + source_scale])
    markers = (".comfy_quant", ".scale_weight", ".weight_scale", "scaled_fp8", ".input_scale", ".scale_input")
    for key, t in a.items():
        if not key.endswith(markers):
            assert_bit_exact(b[key], t)
    stale = {"comfy": (".scale_weight", "scaled_fp8"), "native": (".comfy_quant", ".scale_weight", "scaled_fp8"),
             "comfy-legacy": (".comfy_quant", ".weight_scale")}[target]
    assert not any(k.endswith(stale) for k in b)
    report = work / f"{source_name}-to-{target}.json"
    result = run("validate", out, "--against", source, "--json", report)
    assert result.exit_code == 0, result.output
    tensors = json.loads(report.read_text())["tensors"]
    assert len(tensors) == len(a) - len([k for k in a if k.endswith(markers)])
    assert all(t["exact"] and t["sqnr"] is None for t in tensors)       # inf dB: identical values


def test_a_source_header_config_does_not_follow_into_other_conventions(comfy_header, work):
    out = work / "header-to-legacy.safetensors"
    result = run("convert", comfy_header, out, "--format", "comfy-legacy", "--keep", "*", "--overwrite", "-q")
    assert result.exit_code == 0, result.output
    assert "_quantization_metadata" not in header(out)[1]


def test_legacy_marker_under_the_diffusion_model_prefix(work):
    """A full checkpoint: ComfyUI looks for model.diffusion_model.scaled_fp8."""
    prefix = "model.diffusion_model."
    path = work / "full.safetensors"
    save_file(flux_state_dict(prefix), str(path))
    out = work / "full-legacy.safetensors"
    result = run("convert", path, out, "--format", "comfy-legacy", "--preset", "generic", "--overwrite", "-q")
    assert result.exit_code == 0, result.output
    keys, _ = header(out)
    assert keys[prefix + "scaled_fp8"] == ("F8_E4M3", [0]) and "scaled_fp8" not in keys
    converted = comfy_convert_old_quants(load_file(str(out)), prefix)
    assert comfy_detect_layer_quantization(converted, prefix) == {"mixed_ops": True}
    assert "lie outside" not in result.stderr
    # A quantized layer outside the prefix gets a bare marker that ComfyUI does not look for there.
    sd = flux_state_dict(prefix)
    sd["text_encoders.t5xxl.transformer.encoder.block.0.layer.1.DenseReluDense.wi.weight"] = \
        torch.randn(32, 16).bfloat16()
    save_file(sd, str(path))
    result = run("convert", path, out, "--format", "comfy-legacy", "--preset", "generic", "--overwrite", "-q")
    assert result.exit_code == 0 and "1 quantized weight(s) lie outside model.diffusion_model." in result.stderr
    assert {"scaled_fp8", prefix + "scaled_fp8"} <= header(out)[0].keys()


def hand_made_legacy(path, scale_inputs, marker_elements=0):
    """A scaled_fp8 file as ComfyUI's own tooling wrote them: codes from comfy-kitchen's quantizer,
    0-dim scale_weight and scale_input, the marker under the diffusion-model prefix."""
    prefix = "model.diffusion_model."
    g = torch.Generator().manual_seed(2)
    sd = {prefix + "scaled_fp8": torch.zeros(marker_elements, dtype=torch.float8_e4m3fn)}
    for layer, s_in in scale_inputs.items():
        q, params = TensorCoreFP8Layout.quantize((torch.randn(32, 16, generator=g) * 0.05).bfloat16())
        sd[f"{prefix}{layer}.weight"] = q
        sd[f"{prefix}{layer}.scale_weight"] = params.scale.reshape(())
        sd[f"{prefix}{layer}.scale_input"] = torch.tensor(s_in, dtype=torch.float32)
        sd[f"{prefix}{layer}.bias"] = torch.zeros(32, dtype=torch.bfloat16)
    sd[prefix + "double_blocks.0.img_attn.qkv.weight"] = (torch.randn(48, 16, generator=g) * 0.05).bfloat16()
    save_file(sd, str(path))
    return prefix, sd


@pytest.mark.parametrize("marker_elements", [0, 2])
def test_hand_made_legacy_with_scale_input(work, marker_elements):
    path = work / f"hand-legacy-{marker_elements}.safetensors"
    prefix, sd = hand_made_legacy(path, {"double_blocks.0.img_mlp.0": 1.0, "double_blocks.0.img_mlp.2": 0.5},
                                  marker_elements)
    one, half = prefix + "double_blocks.0.img_mlp.0", prefix + "double_blocks.0.img_mlp.2"
    with SafetensorsFile(path) as f:
        assert detect_format(f).name == "comfy-legacy"
        stored = detect_format(f).stored(f)
    # scale_input belongs to its layer: neither a tensor of its own nor an 'extra' one.
    assert not any(k.endswith((".scale_input", ".scale_weight", "scaled_fp8")) for k in stored)
    # read as stored, 1.0 included (ComfyUI drops it, the value it assumes without one: the same scale)
    assert stored[one + ".weight"].input_scale == 1.0 and stored[half + ".weight"].input_scale == 0.5

    out = work / f"hand-to-comfy-{marker_elements}.safetensors"
    result = run("convert", path, out, "--format", "comfy", "--keep", "*", "--quantize", one, "--quantize", half,
                 "--overwrite", "-q")
    assert result.exit_code == 0, result.output
    keys, _ = header(out)
    b = load_file(str(out))
    # scale_input -> input_scale (1.0 kept: ComfyUI's default for the layer, the same scale), and then no
    # full_precision_matrix_mult unless the legacy marker (2 elements) asked for it.
    assert keys[half + ".input_scale"] == ("F32", []) and b[half + ".input_scale"].item() == 0.5
    assert b[one + ".input_scale"].item() == 1.0 and not any(k.endswith(".scale_input") for k in keys)
    for layer in (one, half):
        assert json.loads(b[layer + ".comfy_quant"].numpy().tobytes()) == (
            {"format": "float8_e4m3fn", "full_precision_matrix_mult": True} if marker_elements == 2
            else {"format": "float8_e4m3fn"})
    for layer in (one, half):
        assert_bit_exact(b[layer + ".weight"], sd[layer + ".weight"])
        assert_bit_exact(b[layer + ".weight_scale"], sd[layer + ".scale_weight"])
    # What ComfyUI makes of the legacy file itself: the same input scales.
    _, _, theirs, _ = comfy_mixed_ops_load(comfy_convert_old_quants(load_file(str(path)), prefix), torch.float32)
    _, _, ours, _ = comfy_mixed_ops_load(b, torch.float32)
    assert theirs.keys() == {half} and ours.keys() == {one, half}      # ComfyUI drops a 1.0 it assumes anyway
    assert torch.equal(theirs[half], ours[half]) and ours[one].item() == 1.0
    result = run("validate", out, "--against", path)
    assert result.exit_code == 0, result.output
    assert "SQNR min inf dB" in result.output

    native = work / f"hand-to-native-{marker_elements}.safetensors"
    result = run("convert", path, native, "--keep", "*", "--overwrite", "-q")
    assert result.exit_code == 0, result.output
    assert not any("scale_input" in k or "input_scale" in k for k in header(native)[0])
    assert run("validate", native, "--against", path).exit_code == 0


def test_formats_command_lists_both():
    result = run("formats")
    assert result.exit_code == 0
    assert "comfy " in result.output and "comfy-legacy" in result.output


# --------------------------------------------------------------- calibrated input scales (convert --stats)

# A plausible calibrated input range per quantized layer (the MLP's second linear sees the GELU's
# outputs of a 4x wider layer: a wider range).
INPUT_RANGES = {layer: (24.0 if layer.endswith("mlp.2") else 6.5) for layer in QUANTIZED}


def stats_file(src, path, fp8="float8_e4m3fn"):
    """A stats file of ``src`` as quantkit calibrate writes one: absmax weight ranges, fixed input ranges."""
    from quantkit.calibration.observers import AbsMax
    from quantkit.calibration.stats import Stats, fingerprint, save
    from quantkit.hashing import sha256_file
    weights = {}
    with SafetensorsFile(str(src)) as f:
        for layer in QUANTIZED:
            obs = AbsMax()
            obs.update(f.read_tensor(f.tensors[layer + ".weight"]).float())
            weights[layer + ".weight"] = obs.statistic()
        source = {"name": src.name, "sha256": sha256_file(str(src)), "fingerprint": fingerprint(f.tensors)}
    stats = Stats(source=source, granularity="tensor", fp8=fp8, weight_observer="absmax", weights=weights,
                  activations={k + ".weight": torch.tensor(v) for k, v in INPUT_RANGES.items()},
                  activation_observer="absmax", samples=8, inputs="fixed test ranges")
    save(stats, str(path), overwrite=True)
    return path


@pytest.fixture(scope="module")
def comfy_static(src, work):
    stats = stats_file(src, work / "flux.stats.safetensors")
    convert(src, work / "comfy-static.safetensors", "--format", "comfy", "--comfy-header-metadata", "--stats", stats)
    return work / "comfy-static.safetensors"


def pow2_at_or_above(x: float) -> float:
    """An independent restatement of quantkit.fp8.static_activation_scale, through log2."""
    return 2.0 ** math.ceil(math.log2(x))


def test_calibrated_comfy_keys_and_configs_to_the_letter(src, comfy_static):
    """Each quantized layer gains <L>.input_scale F32 [] = the power of two at or above range / 448, and its config (marker and
    header alike) loses full_precision_matrix_mult: ComfyUI's FP8 matmul may use the scale."""
    out, meta = header(comfy_static)
    marker = b'{"format":"float8_e4m3fn"}'
    assert out == expected_keys(src, marker, input_scales=True)
    sd = load_file(str(comfy_static))
    for layer, rng in INPUT_RANGES.items():
        assert sd[layer + ".comfy_quant"].numpy().tobytes() == marker
        assert sd[layer + ".input_scale"].item() == pow2_at_or_above(rng / 448.0)
    layers = json.loads(meta["_quantization_metadata"])["layers"]
    assert layers == {layer: {"format": "float8_e4m3fn"} for layer in QUANTIZED}
    assert json.loads(meta["quantkit.stats"])["input_scales"] == len(QUANTIZED)
    with SafetensorsFile(comfy_static) as f:
        stored = detect_format(f).stored(f)
    for layer in QUANTIZED:
        s = stored[layer + ".weight"]
        assert s.input_scale_key == layer + ".input_scale" and s.full_precision_matrix_mult is False


def test_comfyui_fp8_matmul_path_uses_the_input_scale(src, comfy_static):
    """ComfyUI's mixed ops forward on the FP8 path: the input becomes QuantizedTensor.from_float(x,
    layout, scale=input_scale) (comfy-kitchen: x * (1/scale), clamped to +-448, E4M3), then
    F.linear with the FP8 weight. On CPU comfy-kitchen computes it from both dequantized operands:
    equal to F.linear of the fake-quantized input and quantkit's dequantized weight."""
    sd = load_file(str(comfy_static))
    weights, configs, input_scales, _ = comfy_mixed_ops_load(sd, torch.float32)
    assert set(input_scales) == QUANTIZED and not any(c.get("full_precision_matrix_mult") for c in configs.values())
    ours, source = load_dequantized(str(comfy_static)), load_file(str(src))
    g = torch.Generator().manual_seed(3)
    for layer in QUANTIZED:
        w, s = weights[layer + ".weight"], input_scales[layer]
        assert s.dtype == torch.float32 and s.shape == ()
        x = torch.randn(5, w.shape[1], generator=g) * INPUT_RANGES[layer] / 3
        x[0, 0] = 2 * INPUT_RANGES[layer]                      # beyond the calibrated range: clamped
        qx = QuantizedTensor.from_float(x, QUANT_ALGOS[configs[layer]["format"]][1], scale=s)
        assert qx._qdata.dtype == torch.float8_e4m3fn and float(qx._qdata.float().abs().max()) == 448.0
        fake = (x * (1.0 / s)).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s
        bias = source[layer + ".bias"].float()
        # the same products summed in another order (comfy-kitchen's dispatch vs torch's GEMM, which
        # depends on the threads available): float32 rounding, far below FP8's ~1e-2 relative error
        torch.testing.assert_close(F.linear(qx, w, bias), F.linear(fake, ours[layer + ".weight"], bias),
                                   rtol=1e-4, atol=1e-4)


def test_calibrated_e5m2_input_scale_is_over_the_e5m2_maximum(src, work):
    """ComfyUI quantizes a float8_e5m2 layer's input with the E5M2 layout (QUANT_ALGOS): its scale is
    over 57344 (a power of two at or above range / 57344), not over 448."""
    stats = stats_file(src, work / "flux-e5m2.stats.safetensors", fp8="float8_e5m2")
    out = work / "comfy-static-e5m2.safetensors"
    convert(src, out, "--format", "comfy", "--stats", stats)
    sd = load_file(str(out))
    for layer, rng in INPUT_RANGES.items():
        assert sd[layer + ".weight"].dtype == torch.float8_e5m2
        assert sd[layer + ".input_scale"].item() == pow2_at_or_above(rng / 57344.0)
        assert json.loads(sd[layer + ".comfy_quant"].numpy().tobytes()) == {"format": "float8_e5m2"}
    weights, configs, input_scales, _ = comfy_mixed_ops_load(sd, torch.float32)
    layer = "double_blocks.0.img_mlp.2"
    x = torch.full((1, weights[layer + ".weight"].shape[1]), INPUT_RANGES[layer])
    qx = QuantizedTensor.from_float(x, QUANT_ALGOS["float8_e5m2"][1], scale=input_scales[layer],
                                    dtype=torch.float8_e5m2)
    # the calibrated range lands in the E5M2 range's top binade: above half its maximum, never past it
    assert 57344.0 / 2 < float(qx._qdata.float().max()) <= 57344.0


def test_calibrated_legacy_scale_input_becomes_comfyuis_input_scale(src, work):
    stats = stats_file(src, work / "flux-legacy.stats.safetensors")
    out = work / "legacy-static.safetensors"
    convert(src, out, "--format", "comfy-legacy", "--stats", stats)
    keys, _ = header(out)
    sd = load_file(str(out))
    for layer, rng in INPUT_RANGES.items():
        assert keys[layer + ".scale_input"] == ("F32", [])
        assert sd[layer + ".scale_input"].item() == pow2_at_or_above(rng / 448.0)
    _, configs, input_scales, _ = comfy_mixed_ops_load(comfy_convert_old_quants(sd), torch.float32)
    assert set(input_scales) == QUANTIZED and configs == {layer: {"format": "float8_e4m3fn"} for layer in QUANTIZED}
    with SafetensorsFile(out) as f:
        stored = detect_format(f).stored(f)
    assert all(stored[layer + ".weight"].input_scale_key == layer + ".scale_input" for layer in QUANTIZED)


def test_issue_10_bar_calibrate_then_convert_for_comfyui_on_a_diffusers_flux(tmp_path):
    """The commands a user runs: quantkit calibrate on a diffusers FLUX folder (seeded latents over
    steps x seeds), convert --stats --format comfy (BFL names, q/k/v joined), then: ComfyUI's mixed
    ops load every quantized layer with its input scale (F32 [], a power of two, no full-precision
    flag) except the per-sample modulation linears (full precision, no input scale), and the W8A8
    output as the file implies stays within cosine 0.99 of the source, at least as good as scale 1.0."""
    folder = tmp_path / "flux"
    tiny_models.without_zero_layers(tiny_models.build("flux")).save_pretrained(folder)
    stats, out, report = tmp_path / "flux.stats.safetensors", tmp_path / "flux-comfy.safetensors", tmp_path / "v.json"
    r = run("calibrate", folder, "-o", stats, "--format", "comfy", "--recipe", "compact", "-q")
    assert r.exit_code == 0 and "per-sample projection" in r.output, r.output
    r = run("convert", folder, out, "--format", "comfy", "--recipe", "compact", "--stats", stats, "-q")
    assert r.exit_code == 0, r.output
    sd = load_file(str(out))
    _, configs, input_scales, _ = comfy_mixed_ops_load(sd, torch.float32)
    modulation = {layer for layer in configs if layer.endswith("_mod.lin") or layer.endswith("modulation.lin")}
    assert modulation and input_scales and set(input_scales) == set(configs) - modulation
    assert all(configs[layer].get("full_precision_matrix_mult") for layer in modulation)
    for layer, s in input_scales.items():
        assert s.dtype == torch.float32 and s.shape == () and math.frexp(float(s))[0] == 0.5, layer
        assert "full_precision_matrix_mult" not in configs[layer]
    r = run("validate", out, "--against", folder, "--model-output", "--activations", "all", "--json", report, "-q")
    assert r.exit_code == 0, r.output
    rows = {x["row"]: x for x in json.loads(report.read_text())["model_output"]["rows"]}
    assert rows["file"]["cosine"] >= 0.99 and rows["weight-only"]["cosine"] >= 0.99
    # the runtime counts diffusers Linears (a BFL qkv is three): the modulation ones run unquantized
    assert rows["file"]["inputs"]["static"] >= len(input_scales) and rows["file"]["inputs"]["none"] == len(modulation)
    assert rows["file"]["sqnr"] >= rows["unit"]["sqnr"]
