"""Every input layout through the CLI: sharded, diffusers model and pipeline folders, all-in-one
checkpoints with prefixes, EMA and pickles convert and validate; sharded outputs (--max-shard-size)
are written, validated and loaded by transformers; the source is never modified.

Models are real architectures built from small configs (tests/tiny_models.py)."""
import hashlib
import json
import os

import pytest
import torch
from safetensors import safe_open
from tiny_models import build, forward, state_dict_tensors

from quantkit.readback import load_dequantized
from runs import run



def tree_hash(path) -> dict:
    """SHA256 of every file under ``path`` (or of ``path`` itself), to prove the source is untouched."""
    paths = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
    return {p: hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths}


def convert_and_validate(src, dst, *extra, validate_extra=()):
    before = tree_hash(src)
    result = run("convert", src, dst, "-q", *extra)
    assert result.exit_code == 0, result.output
    report = tmp_json = str(dst) + ".report.json"
    result = run("validate", dst, "--against", src, "--min-sqnr", "20", "-q", "--json", tmp_json, *validate_extra)
    assert result.exit_code == 0, result.output
    assert tree_hash(src) == before
    with open(report) as f:
        return json.load(f)


def quantized_keys(path) -> set[str]:
    with safe_open(str(path), "pt") as f:
        return {k for k in f.keys() if f.get_slice(k).get_dtype() == "F8_E4M3"}


# ----------------------------------------------------------------------------- inputs

def test_sharded_input_by_index_and_by_folder(tmp_path):
    model = build("llama")
    src = tmp_path / "llama"
    model.save_pretrained(src, max_shard_size="40KB")
    index = src / "model.safetensors.index.json"
    assert index.exists() and len(list(src.glob("model-*.safetensors"))) >= 3
    out = tmp_path / "a.safetensors"
    report = convert_and_validate(index, out)
    assert report["summary"]["quantized"] > 0
    manifest = json.loads((tmp_path / "a.quantkit.json").read_text())
    assert {f["name"] for f in manifest["source"]["files"]} == {p.name for p in src.glob("model-*.safetensors")}
    # the folder itself is the same checkpoint
    out2 = tmp_path / "b.safetensors"
    convert_and_validate(src, out2)
    assert quantized_keys(out) and quantized_keys(out) == quantized_keys(out2)


def test_diffusers_model_folder_output_matches_the_model(tmp_path):
    model = build("flux")
    model.save_pretrained(tmp_path / "flux")
    out = tmp_path / "flux-fp8.safetensors"
    convert_and_validate(tmp_path / "flux", out)
    assert quantized_keys(out)
    ref = forward("flux", model)
    model.load_state_dict(load_dequantized(str(out), dtype=torch.float32), strict=True)
    got = forward("flux", model)
    assert float((got - ref).norm() / ref.norm()) < 0.05


def test_pipeline_folder_needs_component(tmp_path):
    root = tmp_path / "pipe"
    build("flux").save_pretrained(root / "transformer")
    build("clip_text").save_pretrained(root / "text_encoder")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"],
        "text_encoder": ["transformers", "CLIPTextModel"]}))
    result = run("plan", root)
    assert result.exit_code == 2 and "transformer" in result.output and "text_encoder" in result.output
    result = run("plan", root, "--component", "transformer")
    assert result.exit_code == 0 and "component 'transformer'" in result.output and "preset flux" in result.output
    convert_and_validate(root, tmp_path / "t.safetensors", "--component", "transformer",
                         validate_extra=("--component", "transformer"))


def parts_names(parts: dict) -> list[str]:
    return [p.split(".transformer")[0].rstrip(".") for p in parts]


def test_all_in_one_checkpoint_with_prefixes(tmp_path):
    """An SD1.x-style single file: UNet, VAE and CLIP under LDM prefixes; the unet preset finds its part."""
    from safetensors.torch import save_file
    parts = {"model.diffusion_model.": build("unet_sd15"), "first_stage_model.": build("vae"),
             "cond_stage_model.transformer.": build("clip_text")}
    tensors = {p + k: v for p, m in parts.items() for k, v in state_dict_tensors(m).items()}
    src = tmp_path / "sd15.safetensors"
    save_file(tensors, str(src))
    result = run("plan", src)
    assert result.exit_code == 0, result.output
    assert "model.diffusion_model" in result.output
    out = tmp_path / "sd15-fp8.safetensors"
    convert_and_validate(src, out)
    q = quantized_keys(out)
    assert q and all(k.startswith(("model.diffusion_model.", "cond_stage_model.")) for k in q)
    # one component on its own, its prefix removed: the UNet as a standalone model
    unet = tmp_path / "unet-fp8.safetensors"
    convert_and_validate(src, unet, "--component", "unet")      # validate reopens the recorded component
    model = parts["model.diffusion_model."]
    with safe_open(str(unet), "pt") as f:
        assert set(f.keys()) - {k + "_scale" for k in quantized_keys(unet)} == set(model.state_dict())
    assert quantized_keys(unet) == {k[len("model.diffusion_model."):] for k in q if k.startswith("model.")}
    result = run("plan", src, "--component", "refiner")
    assert result.exit_code == 2 and all(c in result.output for c in parts_names(parts))


def test_pickle_with_ema_converts_either_copy(tmp_path):
    raw, ema = build("llama", seed=0), build("llama", seed=1)
    sd = {"state_dict": {**{f"module.{k}": v for k, v in raw.state_dict().items()},
                         **{f"module.ema.{k}": v for k, v in ema.state_dict().items()}},
          "epoch": 7, "optimizer": {"lr": 1e-4}}
    src = tmp_path / "train.ckpt"
    torch.save(sd, src)
    result = run("plan", src)
    assert result.exit_code == 0, result.output
    assert "EMA" in result.output and "--ema" in result.output
    out_raw, out_ema = tmp_path / "raw.safetensors", tmp_path / "ema.safetensors"
    convert_and_validate(src, out_raw)
    convert_and_validate(src, out_ema, "--ema", validate_extra=("--ema",))
    want = {k: v for k, v in state_dict_tensors(ema, dtype=None).items()}
    got = load_dequantized(str(out_ema), dtype=torch.float32)
    assert set(got) == set(want)
    key = "model.layers.0.mlp.down_proj.weight"
    assert torch.allclose(got[key], want[key].float(), rtol=0.07, atol=1e-3)
    assert not torch.allclose(load_dequantized(str(out_raw), dtype=torch.float32)[key], got[key])


def test_pickle_needing_code_is_refused_and_nothing_written(tmp_path):
    import hostile_pickles
    src = tmp_path / "evil.pt"
    src.write_bytes(hostile_pickles.attack_bytes(tmp_path, "reduce_os_system"))
    result = run("convert", src, tmp_path / "out.safetensors")
    assert result.exit_code == 2 and str(src) in result.output
    assert not os.path.exists(hostile_pickles.marker_path(tmp_path, "reduce_os_system"))
    assert sorted(os.listdir(tmp_path)) == ["evil.pt"]


def test_tied_t5_weights_are_written_under_both_names(tmp_path):
    model = build("t5_encoder")
    assert model.shared.weight.data_ptr() == model.encoder.embed_tokens.weight.data_ptr()
    src = tmp_path / "t5.bin"
    torch.save(model.state_dict(), src)
    out = tmp_path / "t5.safetensors"
    convert_and_validate(src, out)
    with safe_open(str(out), "pt") as f:
        assert torch.equal(f.get_tensor("shared.weight"), f.get_tensor("encoder.embed_tokens.weight"))


# ----------------------------------------------------------------------------- sharded outputs

def test_max_shard_size_writes_an_index_and_validates(tmp_path):
    model = build("llama")
    src = tmp_path / "llama.safetensors"
    from safetensors.torch import save_file
    save_file(state_dict_tensors(model), str(src))
    out = tmp_path / "llama-fp8"
    report = convert_and_validate(src, out, "--max-shard-size", "30KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    for name in shards:       # a weight and its scale share a shard
        with safe_open(str(out / name), "pt") as f:
            keys = set(f.keys())
        assert all(k[: -len("_scale")] in keys for k in keys if k.endswith(".weight_scale"))
    assert report["summary"]["quantized"] > 0
    # one flipped byte in one shard: validation fails and names that shard
    victim = out / shards[1]
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0x40
    victim.write_bytes(bytes(data))
    result = run("validate", out)
    assert result.exit_code == 1 and shards[1] in result.output


def test_sharded_compressed_tensors_output_loads_in_transformers(tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM
    model = build("llama")
    model.save_pretrained(tmp_path / "llama")
    out = tmp_path / "llama-ct"
    convert_and_validate(tmp_path / "llama", out, "--format", "compressed-tensors", "--max-shard-size", "40KB")
    assert (out / "model.safetensors.index.json").exists() and (out / "config.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.arange(1, 17).reshape(1, 16)
    with torch.no_grad():
        ref, got = model(ids).logits, loaded(ids).logits
    assert float((got - ref).norm() / ref.norm()) < 0.05


def test_comfy_formats_refuse_sharding(tmp_path):
    from safetensors.torch import save_file
    src = tmp_path / "m.safetensors"
    save_file(state_dict_tensors(build("llama")), str(src))
    result = run("convert", src, tmp_path / "o.safetensors", "--format", "comfy", "--max-shard-size", "1MB")
    assert result.exit_code == 2 and "max-shard-size" in result.output
    result = run("convert", src, tmp_path / "o.safetensors", "--max-shard-size", "lots")
    assert result.exit_code == 2 and "bad size" in result.output


# ----------------------------------------------------------------------------- the source is never touched

def test_read_only_source_and_destinations_that_would_touch_it(tmp_path):
    model = build("llama")
    src = tmp_path / "llama"
    model.save_pretrained(src, max_shard_size="40KB")
    shard = sorted(src.glob("model-*.safetensors"))[0]
    for p in src.iterdir():
        p.chmod(0o444)
    before = tree_hash(src)
    # a shard of the source, reached through '..'; the source folder itself; a folder holding it
    for dst, extra in ((tmp_path / "llama" / ".." / "llama" / shard.name, ("--overwrite",)),
                       (src, ("--overwrite", "--format", "compressed-tensors")),
                       (tmp_path, ("--overwrite", "--max-shard-size", "1MB"))):
        result = run("convert", src, dst, "-q", *extra)
        assert result.exit_code == 2 and "source" in result.output, (dst, result.output)
    assert tree_hash(src) == before
    convert_and_validate(src, tmp_path / "ok.safetensors")
    assert tree_hash(src) == before


def test_overwrite_never_deletes_a_folder_quantkit_did_not_write(tmp_path):
    from safetensors.torch import save_file
    src = tmp_path / "m.safetensors"
    save_file(state_dict_tensors(build("llama")), str(src))
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "cat.jpg").write_bytes(b"meow")
    result = run("convert", src, mine, "--max-shard-size", "50KB", "--overwrite", "-q")
    assert result.exit_code == 2 and "did not write" in result.output
    assert (mine / "cat.jpg").read_bytes() == b"meow"
    out = tmp_path / "out"
    for _ in range(2):          # a quantkit output folder is replaced
        result = run("convert", src, out, "--max-shard-size", "50KB", "--overwrite", "-q")
        assert result.exit_code == 0, result.output
