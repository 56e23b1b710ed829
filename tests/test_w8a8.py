"""FP8 activations measured on CPU: quantkit.runtime.load(..., activations=) quantizes the inputs of
FP8 Linears to E4M3 and back (static input_scale, ComfyUI's 1.0, per token), and validate
--model-output reports weight-only and W8A8 rows side by side.

The fake-quant math is checked against quantkit.testing.reference's independent E4M3 codec; a tiny
diffusers FLUX is converted to comfy and given input scales calibrated by forward hooks on the
source (absmax / 448 over other seeds than validate's), in two regimes: activations past 448 (the
MLPs' hidden layers scaled up) and all small (the model as built)."""
import json
import shutil
import struct

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import build, without_zero_layers

import quantkit.runtime as qr
from quantkit.comfy_names import flux_to_bfl
from quantkit.manifest import manifest_path
from quantkit.reader import TensorInfo
from quantkit.dtypes import from_torch
from quantkit.runtime.weights import InputQuant, quantized_input
from quantkit.testing import reference as R
from runs import run

E4M3_MAX = 448.0


# ----------------------------------------------------------------------------- the math

def _reference(x: np.ndarray, scale) -> np.ndarray:
    """codes of clamp(x / s) decoded and multiplied by s, all in numpy (reference.quantize saturates)."""
    s = np.asarray(scale, dtype=np.float32)
    return (R.decode(R.quantize(x, s)) * s.astype(np.float64)).astype(np.float32)


finite = st.floats(-1e6, 1e6, allow_nan=False, width=32)
rows = st.lists(st.lists(finite, min_size=1, max_size=12), min_size=1, max_size=6).filter(
    lambda r: len({len(x) for x in r}) == 1)


@given(rows, st.floats(2.0 ** -20, 1024.0, width=32))
def test_static_scale_is_the_reference_fake_quant(values, scale):
    x = torch.tensor(values, dtype=torch.float32)
    got = quantized_input(x, InputQuant(scale)).numpy()
    want = _reference(x.numpy(), np.float32(scale))
    assert np.array_equal(got, want), (got, want)
    assert np.abs(got).max() <= E4M3_MAX * np.float32(scale) * (1 + 1e-6)     # saturated, never NaN


@given(rows)
def test_unit_scale_clamps_at_448(values):
    x = torch.tensor(values, dtype=torch.float32)
    got = quantized_input(x, InputQuant(1.0)).numpy()
    assert np.array_equal(got, R.decode(R.encode(x.numpy())).astype(np.float32))
    assert np.abs(got).max() <= E4M3_MAX and not np.isnan(got).any()


@given(rows)
def test_dynamic_scale_is_per_row_absmax_over_448(values):
    x = torch.tensor(values, dtype=torch.float32)
    got = quantized_input(x, InputQuant(None)).numpy()
    a = np.abs(x.numpy()).max(axis=1, keepdims=True).astype(np.float64)
    s = np.where(a == 0, 1.0, a / E4M3_MAX).astype(np.float32)              # independent: float64 then float32
    # a subnormal absmax whose scale underflows float32 gets the smallest normal (quantkit.fp8.scale_from_absmax)
    s = np.where(s == 0, np.finfo(np.float32).tiny, s).astype(np.float32)
    assert np.array_equal(got, _reference(x.numpy(), s))
    nonzero = a[:, 0] > 0
    # each row's absmax is exactly representable: 448 * s
    assert np.allclose(np.abs(got).max(axis=1)[nonzero], (E4M3_MAX * s[:, 0].astype(np.float64))[nonzero], rtol=1e-6)


def test_edge_values():
    x = torch.tensor([[0.0, -0.0, 448.0, 464.0, -1e30, float("inf"), 2.0 ** -9, 2.0 ** -10]])
    got = quantized_input(x, InputQuant(1.0))
    assert got.tolist() == [[0.0, -0.0, 448.0, 448.0, -448.0, 448.0, 2.0 ** -9, 0.0]]   # -10: below half the smallest subnormal
    assert torch.signbit(got[0, 1])
    assert quantized_input(torch.zeros(3, 4), InputQuant(None)).eq(0).all()              # all-zero rows: scale 1
    assert quantized_input(torch.tensor([[1.0, 2.0]], dtype=torch.bfloat16), InputQuant(0.5)).dtype == torch.bfloat16


# ----------------------------------------------------------------------------- tiny FLUX with calibrated scales

def _bigger_mlps(model, factor: float):
    """Scale every MLP's hidden layer up by ``factor`` and its output layer down: the GELU-tanh is
    not homogeneous, so the function changes a little, but the inputs of ff.net.2, ff_context.net.2
    and the MLP half of each single block's proj_out now reach thousands (past E4M3's 448)."""
    with torch.no_grad():
        for block in model.transformer_blocks:
            for ff in (block.ff, block.ff_context):
                ff.net[0].proj.weight.mul_(factor)
                ff.net[0].proj.bias.mul_(factor)
                ff.net[2].weight.div_(factor)
        for block in model.single_transformer_blocks:
            block.proj_mlp.weight.mul_(factor)
            block.proj_mlp.bias.mul_(factor)
            block.proj_out.weight[:, model.inner_dim:].div_(factor)
    return model


def _input_absmax(model, inputs: list[dict]) -> dict[str, float]:
    """Diffusers Linear weight name -> absmax of its input over ``inputs`` (forward pre-hooks)."""
    seen: dict[str, float] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            def hook(mod, args, name=name):
                seen[name + ".weight"] = max(seen.get(name + ".weight", 0.0), float(args[0].abs().max()))
            hooks.append(m.register_forward_pre_hook(hook))
    with torch.no_grad():
        for kwargs in inputs:
            model(**kwargs)
    for h in hooks:
        h.remove()
    return seen


def _calibration_inputs(folder, seeds=(1, 2, 3)) -> list[dict]:
    """The inputs validate feeds (quantkit.model_output), on other seeds than its own (0)."""
    from quantkit.models import build_model
    from quantkit.sources import open_source
    with open_source(str(folder)) as src:
        return [build_model(src, seed).inputs for seed in seeds]


def _with_input_scales(comfy_file, out, model, absmax: dict[str, float], full_precision=()):
    """``comfy_file`` rewritten with ``<L>.input_scale`` = absmax / 448 (F32 []) for every FP8 layer
    and its layer config without full_precision_matrix_mult, except the layers in ``full_precision``
    (left as converted). The BFL layer's input is its diffusers parts' (they share it)."""
    infos = {n: TensorInfo(n, from_torch(t.dtype), tuple(t.shape), 0, t.numel() * t.element_size())
             for n, t in model.state_dict().items()}
    parts = flux_to_bfl(infos)
    with safe_open(str(comfy_file), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    for key in [k for k in tensors if k.endswith(".comfy_quant")]:
        layer = key[: -len(".comfy_quant")]
        if layer in full_precision:
            continue
        amax = max(absmax[target] for target, _, _ in parts[layer + ".weight"])
        conf = json.loads(bytes(tensors[key].tolist()))
        conf.pop("full_precision_matrix_mult", None)
        raw = json.dumps(conf, sort_keys=True, separators=(",", ":")).encode()
        tensors[key] = torch.tensor(list(raw), dtype=torch.uint8)
        # struct: the scale as float32, as a writer rounds it
        tensors[layer + ".input_scale"] = torch.tensor(struct.unpack("<f", struct.pack("<f", amax / E4M3_MAX))[0])
    save_file(tensors, str(out), metadata=meta)
    # the manifest says which source names the output was made under (BFL's); its hashes are stale
    shutil.copy(manifest_path(str(comfy_file)), manifest_path(str(out)))
    return out


@pytest.fixture(scope="module")
def flux_regimes(tmp_path_factory):
    """regime -> (source folder, comfy file with calibrated input scales, diffusers model, absmax)."""
    made = {}
    for regime, factor in (("large", 2000.0), ("small", 1.0)):
        root = tmp_path_factory.mktemp(f"flux-{regime}")
        model = _bigger_mlps(without_zero_layers(build("flux")), factor)
        model.save_pretrained(root / "src")
        plain = root / "comfy.safetensors"
        result = run("convert", root / "src", plain, "--format", "comfy", "-q")
        assert result.exit_code == 0, result.output
        absmax = _input_absmax(model, _calibration_inputs(root / "src"))
        calibrated = _with_input_scales(plain, root / "calibrated.safetensors", model, absmax)
        made[regime] = root / "src", calibrated, model, absmax, plain
    return made


def _validate(tmp_path, out, src, *extra):
    report = tmp_path / f"r{len(list(tmp_path.glob('r*.json')))}.json"
    result = run("validate", out, "--against", src, "--no-hash-check", "--model-output", "-q", "--json", report,
                 *extra)
    return result, json.loads(report.read_text())["model_output"] if report.exists() else None


@pytest.mark.parametrize("regime", ["large", "small"])
def test_validate_reports_weight_only_and_w8a8_rows(flux_regimes, tmp_path, regime):
    src, calibrated, _, absmax, _ = flux_regimes[regime]
    result, m = _validate(tmp_path, calibrated, src, "--activations", "all")
    assert result.exit_code == 0, result.output
    rows = {r["row"]: r for r in m["rows"]}
    assert list(rows) == ["weight-only", "file", "unit", "dynamic"]
    assert m["sqnr"] == rows["weight-only"]["sqnr"]                      # top level: the weight-only row
    assert rows["file"]["inputs"] == {"static": 24} and rows["unit"]["inputs"] == {"unit": 24}
    assert "24 static" in rows["file"]["loaded_by"] and rows["weight-only"]["inputs"] == {"none": 24}
    for r in rows.values():
        assert {"sqnr", "psnr", "cosine", "what", "loaded_by"} <= set(r)
    big = max(absmax.values())
    print(f"tiny FLUX, {regime} activations (largest Linear input {big:.1f}): " + ", ".join(
        f"{n} {r['sqnr']:.2f} dB / cos {r['cosine']:.6f}" for n, r in rows.items()))
    for line in ("weight-only", "file", "unit", "dynamic"):
        assert any(x.strip().startswith(line) for x in result.output.splitlines()), result.output
    # Activation quantization costs fidelity. Measured (weights seed 0): large: weight-only 45.91 dB, file
    # 43.25, unit 21.29, dynamic 43.08; small: 46.83, 44.22, 44.60, 44.40. Past 448, scale 1.0 clamps
    # the MLPs' inputs and calibrated scales win by 22 dB. When every input is small, E4M3 is floating
    # point: 1.0 loses only below 2^-6 (subnormals), which these inputs barely reach, and absmax / 448
    # scales come out 0.4 dB *below* 1.0 (weights seeds 0-2: -0.38, -0.42, -0.42 dB); the same scales
    # rounded up to a power of two tie with 1.0 (-0.06, 0.00, -0.01 dB).
    assert rows["weight-only"]["sqnr"] > max(rows[n]["sqnr"] for n in ("file", "unit", "dynamic"))
    if regime == "large":
        assert big > 4 * E4M3_MAX
        assert rows["file"]["sqnr"] > rows["unit"]["sqnr"] + 10      # 1.0 clamps the MLPs' inputs at 448
        assert rows["file"]["cosine"] > 0.9999 > rows["unit"]["cosine"]
    else:
        assert big < E4M3_MAX
        assert abs(rows["file"]["sqnr"] - rows["unit"]["sqnr"]) < 1.0


def test_default_runs_the_file_row_only_when_the_file_quantizes_inputs(flux_regimes, tmp_path):
    src, calibrated, _, _, plain = flux_regimes["large"]
    result, m = _validate(tmp_path, plain, src)                          # default --activations file
    assert result.exit_code == 0, result.output
    assert [r["row"] for r in m["rows"]] == ["weight-only", "file"]
    file_row = m["rows"][1]
    assert file_row["same_as"] == "weight-only" and file_row["inputs"] == {"none": 24}  # full_precision_matrix_mult
    assert "the file quantizes no input" in result.output
    result, m = _validate(tmp_path, calibrated, src, "--activations", "none")
    assert result.exit_code == 0, result.output
    assert [r["row"] for r in m["rows"]] == ["weight-only"]


def test_full_precision_layers_keep_their_inputs_in_file_mode(flux_regimes, tmp_path):
    src, _, model, absmax, plain = flux_regimes["large"]
    mixed = _with_input_scales(plain, tmp_path / "mixed.safetensors", model, absmax,
                               full_precision={"double_blocks.0.img_mlp.2", "single_blocks.1.linear2"})
    with qr.empty_weights():
        loaded = type(model).from_config(model.config).eval()
    qr.load(loaded, str(mixed), compute_dtype=torch.float32, activations="file")
    assert loaded.quantkit_runtime.inputs == {"static": 22, "none": 2}
    assert loaded.transformer_blocks[0].ff.net[2]._quantkit_held["weight"].input is None
    assert loaded.single_transformer_blocks[1].proj_out._quantkit_held["weight"].input is None
    assert loaded.transformer_blocks[0].ff_context.net[2]._quantkit_held["weight"].input.scheme == "static"
    # a comfy layer without input_scale and without the flag: ComfyUI's scale 1.0
    with safe_open(str(mixed), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    del tensors["double_blocks.1.img_mlp.2.input_scale"]
    bare = tmp_path / "bare.safetensors"
    save_file(tensors, str(bare), metadata=meta)
    with qr.empty_weights():
        loaded = type(model).from_config(model.config).eval()
    qr.load(loaded, str(bare), compute_dtype=torch.float32, activations="file")
    assert loaded.quantkit_runtime.inputs == {"static": 21, "none": 2, "unit": 1}
    assert loaded.transformer_blocks[1].ff.net[2]._quantkit_held["weight"].input == InputQuant(1.0)


@pytest.mark.parametrize("activations", ["file", "unit", "dynamic"])
def test_scaled_mm_with_the_stored_scales_is_the_simulation(flux_regimes, activations):
    """CPU torch._scaled_mm fed the stored codes and the activation scales gives the simulated output
    (the same products in float32; only the order of the sums differs): the check a GPU would run."""
    src, calibrated, model, _, _ = flux_regimes["large"]
    from quantkit.models import build_model
    from quantkit.sources import open_source
    with open_source(str(src)) as s:
        inputs = build_model(s, 0).inputs
    outs = {}
    for matmul in ("dequantize", "fp8"):
        with qr.empty_weights():
            loaded = type(model).from_config(model.config).eval()
        qr.load(loaded, str(calibrated), compute_dtype=torch.float32, matmul=matmul, activations=activations)
        with torch.no_grad():
            outs[matmul] = loaded(**inputs)[0]
        if matmul == "fp8":
            assert loaded.quantkit_runtime.kernels["scaled_mm"] > 0
    a, b = outs["dequantize"].double(), outs["fp8"].double()
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(a.abs().max())), (a - b).abs().max()


def test_scaled_mm_uses_the_static_scale_layer_by_layer(tmp_path):
    """One Linear: the fp8 kernel's output equals the reference W8A8 product with the file's input
    scale (and differs from the dynamic per-tensor scale it used before)."""
    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(64, 32)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(32, 64, generator=g) * 0.05)
    src = tmp_path / "src.safetensors"
    save_file({"0.weight": layer.weight.detach().contiguous(), "0.bias": layer.bias.detach().contiguous()}, str(src))
    out = tmp_path / "out.safetensors"
    assert run("convert", src, out, "--format", "comfy", "--quantize", "*", "--preset", "generic", "-q").exit_code == 0
    with safe_open(str(out), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    tensors["0.input_scale"] = torch.tensor(0.0078125)
    tensors["0.comfy_quant"] = torch.tensor(list(b'{"format":"float8_e4m3fn"}'), dtype=torch.uint8)
    save_file(tensors, str(out), metadata=meta)
    x = torch.randn(5, 64, generator=g) * 3
    with qr.empty_weights():
        model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    qr.load(model, str(out), compute_dtype=torch.float32, matmul="fp8")    # activations="none": the file's scale
    got = model(x).double()
    q, s = model[0].weight_fp8, model[0].weight_scale
    xq = torch.from_numpy(_reference(x.numpy(), np.float32(0.0078125))).double()
    want = xq @ (q.double() * s.double()).T + model[0].bias.double()
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6), (got - want).abs().max()
    assert model.quantkit_runtime.inputs == {"static": 1}


# ----------------------------------------------------------------------------- errors

def test_bad_values_are_one_line_errors(flux_regimes, tmp_path):
    src, calibrated, model, _, _ = flux_regimes["small"]
    with pytest.raises(ValueError, match="activations 'static': use one of none, file, unit, dynamic"):
        qr.load(torch.nn.Linear(2, 2), str(calibrated), activations="static")
    result = run("validate", calibrated, "--against", src, "--model-output", "--activations", "some")
    assert result.exit_code == 2 and "'some' is not one of 'none', 'file', 'all'" in result.output
    result = run("validate", calibrated, "--against", src, "--min-w8a8-sqnr", "nan")
    assert result.exit_code == 2 and "--min-w8a8-sqnr" in result.output, result.output
    result = run("validate", calibrated, "--min-w8a8-sqnr", "30")
    assert result.exit_code == 2 and "pass --against SRC" in result.output, result.output
    # a zero input scale divides every input into Inf/NaN: the output is refused at load, by name
    with safe_open(str(calibrated), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    tensors["double_blocks.0.img_mlp.2.input_scale"] = torch.tensor(0.0)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    shutil.copy(manifest_path(str(calibrated)), manifest_path(str(bad)))
    result = run("validate", bad, "--against", src, "--no-hash-check", "--model-output")
    assert result.exit_code == 1, result.output
    assert "double_blocks.0.img_mlp.2.input_scale" in result.output and "positive finite" in result.output


def test_min_w8a8_sqnr_fails_the_file_row(flux_regimes, tmp_path):
    src, calibrated, _, _, _ = flux_regimes["large"]
    result, m = _validate(tmp_path, calibrated, src, "--min-w8a8-sqnr", "200")
    assert result.exit_code == 1 and "--min-w8a8-sqnr 200" in result.output, result.output
    assert m["rows"][1]["row"] == "file" and m["rows"][1]["sqnr"] < 200


# ----------------------------------------------------------------------------- compressed-tensors W8A8 static

def _ct_w8a8(tmp_path, input_scale: float):
    """A tiny Llama converted to compressed-tensors, then made W8A8 static by hand (what convert
    --stats will write): ``float-quantized`` with static input activations and ``<L>.input_scale`` [1]."""
    from safetensors.torch import load_file

    from quantkit.dtypes import Granularity
    from quantkit.formats.compressed_tensors import quantization_config
    build("llama").save_pretrained(tmp_path / "llama")
    out = tmp_path / f"ct-{input_scale}"
    assert run("convert", tmp_path / "llama", out, "--format", "compressed-tensors", "-q").exit_code == 0
    config = json.loads((out / "config.json").read_text())
    q = config["quantization_config"]
    config["quantization_config"] = quantization_config(
        Granularity(q["config_groups"]["group_0"]["weights"]["strategy"]), q["ignore"], input_scales=True)
    (out / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(out / "model.safetensors"))
    for key in [k for k in tensors if k.endswith(".weight_scale")]:
        tensors[key[: -len(".weight_scale")] + ".input_scale"] = torch.tensor([input_scale], dtype=tensors[key].dtype)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return tmp_path / "llama", out


def test_transformers_quantizes_the_inputs_of_a_w8a8_static_folder_on_cpu(tmp_path):
    """What the compressed-tensors client computes: transformers (5.x) with compressed-tensors (0.20)
    wraps each targeted Linear's forward (``set_forward_quantized``), which fake-quantizes its input
    with the stored input_scale on CPU too. Measured on the tiny Llama: weight-only 47.4 dB; input
    scale 0.01 45.2 dB, 1.0 41.7 dB, 1e-4 22.4 dB (everything clamped). So validate's transformers
    run of such a folder is its W8A8 "file" row, and its weight-only row comes from the runtime."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("compressed_tensors")
    src, tiny = _ct_w8a8(tmp_path, 1e-4)
    _, good = _ct_w8a8(tmp_path, 0.01)
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))

    def logits(folder):
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            return model(input_ids=ids).logits

    ref = logits(src)

    def sqnr(y):
        return float(10 * torch.log10(ref.pow(2).sum() / (ref - y).pow(2).sum()))
    assert sqnr(logits(tiny)) < 30 < sqnr(logits(good))


def test_validate_rows_of_a_w8a8_static_compressed_tensors_folder(tmp_path):
    from quantkit.formats import detect_format
    from quantkit.readback import open_output
    src, out = _ct_w8a8(tmp_path, 0.01)
    with open_output(str(out)) as f:
        stored = detect_format(f).stored(f)
    assert any(s.input_scale_key for s in stored.values())
    result, m = _validate(tmp_path, out, src, "--activations", "all")
    assert result.exit_code == 0, result.output
    rows = {r["row"]: r for r in m["rows"]}
    assert list(rows) == ["weight-only", "file", "unit", "dynamic"]
    assert rows["file"]["loaded_by"] == "transformers (compressed-tensors)"
    assert rows["weight-only"]["loaded_by"].startswith("quantkit.runtime") and rows["unit"]["inputs"]


def test_validate_report_shows_the_rows(flux_regimes, tmp_path):
    pytest.importorskip("matplotlib")
    src, calibrated, _, _, _ = flux_regimes["large"]
    folder = tmp_path / "report"
    result = run("validate", calibrated, "--against", src, "--no-hash-check", "--model-output", "--activations",
                 "all", "--report", folder, "-q")
    assert result.exit_code == 0, result.output
    md = (folder / "report.md").read_text()
    doc = json.loads((folder / "report.json").read_text())
    for r in doc["model_output"]["rows"]:
        assert f"| {r['row']} | {r['sqnr']:.2f} |" in md
    assert (folder / "model_output.png").stat().st_size > 1000


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs an FP8-capable GPU (compute capability 8.9+)")
@pytest.mark.parametrize("activations", ["file", "dynamic"])
def test_gpu_scaled_mm_with_the_stored_scales_is_the_cpu_simulation(flux_regimes, activations):
    """The check a GPU runs: CUDA torch._scaled_mm on the stored codes and the file's input scales
    (bf16 out, as its row-wise path requires) against the CPU simulation in float32."""
    src, calibrated, model, _, _ = flux_regimes["large"]
    from quantkit.models import build_model
    from quantkit.sources import open_source
    with open_source(str(src)) as s:
        inputs = build_model(s, 0).inputs
    outs = {}
    for device, matmul, dtype in (("cpu", "dequantize", torch.float32), ("cuda", "fp8", torch.bfloat16)):
        with qr.empty_weights():
            loaded = type(model).from_config(model.config).eval()
        qr.load(loaded, str(calibrated), compute_dtype=dtype, matmul=matmul, activations=activations)
        loaded.to(device)
        moved = {k: v.to(device, dtype) if torch.is_tensor(v) and v.is_floating_point() else
                 v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        with torch.no_grad():
            outs[device] = loaded(**moved)[0].float().cpu()
        if device == "cuda":
            assert loaded.quantkit_runtime.kernels.get("scaled_mm", 0) > 0
    a, b = outs["cpu"].double(), outs["cuda"].double()
    cos = float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))
    assert cos > 0.999, cos
