"""open_checkpoint reads every layout built from real architectures byte-exactly, and refuses hostile input.

Each layout test writes a checkpoint the way its tool writes it (transformers / diffusers
save_pretrained, torch.save of training-style dicts) and proves that every tensor read back
through the Checkpoint equals the original, bit for bit, under the name the pipeline should see.
"""
import json
import os

import hostile_pickles
import pytest
import torch
from safetensors.torch import save_file
from tiny_models import build, state_dict_tensors

from quantkit.checkpoint import (
    AMBIGUOUS,
    component_of,
    find_prefixed_ema,
    open_checkpoint,
)
from quantkit.errors import HeaderError, QuantkitError, UnsupportedInputError
from quantkit.reader import SafetensorsFile, TensorSource
from runs import sha256


def read_all(ckpt) -> dict[str, torch.Tensor]:
    return {name: ckpt.read_tensor(info).clone() for name, info in ckpt.tensors.items()}


def assert_same(got: dict, want: dict) -> None:
    assert set(got) == set(want), (set(got) ^ set(want))
    for name, t in want.items():
        g = got[name]
        assert g.dtype == t.dtype and g.shape == t.shape, name
        assert torch.equal(g.reshape(-1).view(torch.uint8), t.contiguous().reshape(-1).view(torch.uint8)), name


@pytest.fixture(scope="module")
def bert_sd():
    return state_dict_tensors(build("bert"), dtype=None)


# ----------------------------------------------------------------------------- safetensors, sharded, folders

def test_single_safetensors_is_the_file_itself(tmp_path, bert_sd):
    path = tmp_path / "bert.safetensors"
    save_file(bert_sd, str(path), metadata={"format": "pt"})
    with open_checkpoint(path) as ckpt, SafetensorsFile(path) as f:
        assert isinstance(ckpt, TensorSource)
        assert ckpt.layout == "safetensors" and ckpt.files == [str(path)] and ckpt.metadata == {"format": "pt"}
        assert ckpt.tensors == f.tensors       # same infos, real offsets: the pipeline sees no difference
        assert_same(read_all(ckpt), bert_sd)


def test_sharded_transformers_save_pretrained(tmp_path):
    model = build("llama")
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    want = state_dict_tensors(model, dtype=None)
    index = tmp_path / "model.safetensors.index.json"
    assert index.exists()
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) >= 3
    before = {p: sha256(tmp_path / p) for p in shards}
    with open_checkpoint(index) as ckpt:
        assert ckpt.layout == "sharded" and ckpt.metadata == {"format": "pt"}   # shards agree: kept
        assert sorted(os.path.basename(f) for f in ckpt.files) == shards
        assert f"sharded checkpoint: {len(shards)} shards (model.safetensors.index.json)" in ckpt.notes
        assert_same(read_all(ckpt), want)
        rows = [x.clone() for _, _, x in ckpt.iter_rows(ckpt.tensors["model.embed_tokens.weight"], 1000)]
        assert torch.equal(torch.cat(rows), want["model.embed_tokens.weight"])
    with open_checkpoint(tmp_path) as ckpt:    # the folder: config.json + index
        assert ckpt.layout == "model-folder" and "LlamaForCausalLM" in ckpt.notes[0]
        assert_same(read_all(ckpt), want)
    assert before == {p: sha256(tmp_path / p) for p in shards}


def test_diffusers_model_folder_single_and_sharded(tmp_path):
    flux = build("flux")
    flux.save_pretrained(tmp_path / "flux")
    with open_checkpoint(tmp_path / "flux") as ckpt:
        assert ckpt.layout == "model-folder"
        assert [os.path.basename(f) for f in ckpt.files] == ["diffusion_pytorch_model.safetensors"]
        assert "FluxTransformer2DModel" in ckpt.notes[0]
        assert_same(read_all(ckpt), state_dict_tensors(flux, dtype=None))
    vae = build("vae")
    vae.save_pretrained(tmp_path / "vae", max_shard_size="100KB")
    assert (tmp_path / "vae" / "diffusion_pytorch_model.safetensors.index.json").exists()
    with open_checkpoint(tmp_path / "vae") as ckpt:
        assert ckpt.layout == "model-folder" and len(ckpt.files) >= 2
        assert_same(read_all(ckpt), state_dict_tensors(vae, dtype=None))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    models = {"transformer": build("flux"), "vae": build("vae"), "text_encoder": build("clip_text")}
    for name, m in models.items():
        m.save_pretrained(root / name)
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "vocab.json").write_text("{}")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text("{}")
    index = {"_class_name": "FluxPipeline", "_diffusers_version": "0.42.1",
             "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "../escape": ["x", "y"]}
    (root / "model_index.json").write_text(json.dumps(index))
    return root, {k: state_dict_tensors(m, dtype=None) for k, m in models.items()}


def test_pipeline_needs_a_component_and_lists_those_with_weights(pipeline):
    root, _ = pipeline
    with pytest.raises(UnsupportedInputError) as info:
        open_checkpoint(root)
    assert "with weights: transformer, vae, text_encoder" in str(info.value) and str(root) in str(info.value)
    for bad in ("tokenizer", "unet", "../pipe", "transformer/../vae", "."):
        with pytest.raises(UnsupportedInputError, match="transformer, vae, text_encoder"):
            open_checkpoint(root, component=bad)


@pytest.mark.parametrize("component", ["transformer", "vae", "text_encoder"])
def test_pipeline_component(pipeline, component):
    root, want = pipeline
    with open_checkpoint(root, component=component) as ckpt:
        assert ckpt.layout == f"diffusers-pipeline/{component}" and ckpt.path == str(root)
        assert all(os.path.dirname(f) == str(root / component) for f in ckpt.files)
        assert_same(read_all(ckpt), want[component])


# ----------------------------------------------------------------------------- pickles

def test_plain_state_dict_pickle_and_old_non_zip_format(tmp_path, bert_sd):
    for name, kw in (("new.pt", {}), ("old.bin", {"_use_new_zipfile_serialization": False})):
        torch.save(bert_sd, tmp_path / name, **kw)
        before = sha256(tmp_path / name)
        with open_checkpoint(tmp_path / name) as ckpt:
            assert ckpt.layout == "pickle" and ckpt.files == [str(tmp_path / name)] and ckpt.metadata == {}
            assert_same(read_all(ckpt), bert_sd)
        assert sha256(tmp_path / name) == before


def test_training_wrapper_with_metadata_and_dataparallel_prefix(tmp_path, bert_sd):
    blob = {"epoch": 3, "global_step": 1000, "optimizer": {"state": {0: {"exp_avg": torch.ones(2)}}},
            "model": {"module." + k: v for k, v in bert_sd.items()}}
    torch.save(blob, tmp_path / "train.pth")
    with open_checkpoint(tmp_path / "train.pth") as ckpt:
        assert_same(read_all(ckpt), bert_sd)
        notes = " | ".join(ckpt.notes)
        assert "epoch=3" in notes and "global_step=1000" in notes and "optimizer (dict)" in notes
        assert "'module.' prefix" in notes and "'model'" in notes


def test_nested_dicts_flatten_with_dots_and_non_tensors_are_reported(tmp_path):
    a, b, c = torch.randn(4, 4), torch.arange(6, dtype=torch.int64), torch.tensor([True, False])
    torch.save({"state_dict": {"encoder": {"layer": {"weight": a}, "steps": b}, "mask": c, "name": "tiny",
                               "lr": 0.5}}, tmp_path / "n.ckpt")
    with open_checkpoint(tmp_path / "n.ckpt") as ckpt:
        assert_same(read_all(ckpt), {"encoder.layer.weight": a, "encoder.steps": b, "mask": c})
        assert any("2 non-tensor entries ignored: name='tiny', lr=0.5" in n for n in ckpt.notes)


def test_strided_and_mixed_dtype_tensors(tmp_path):
    base = torch.randn(6, 8)
    tensors = {"t": base.t(), "slice": base[2:4, 1:5], "bf16": torch.randn(3, 5).to(torch.bfloat16),
               "f16": torch.randn(7).half(), "i8": torch.arange(-4, 4, dtype=torch.int8), "scalar": torch.tensor(2.5),
               "empty": torch.zeros(0, 3), "fp8": torch.randn(4, 4).to(torch.float8_e4m3fn)}
    torch.save(tensors, tmp_path / "m.pt")
    with open_checkpoint(tmp_path / "m.pt") as ckpt:
        assert_same(read_all(ckpt), tensors)
        info = ckpt.tensors["t"]
        chunks = torch.cat([x.clone() for _, _, x in ckpt.iter_rows(info, 32)])
        assert torch.equal(chunks, base.t())
        assert b"".join(ckpt.iter_bytes(info, 12)) == base.t().contiguous().numpy().tobytes()
        assert any("tied/shared" in n and "t = slice" in n for n in ckpt.notes)


def test_tied_t5_weights_keep_both_names(tmp_path):
    model = build("t5_encoder")
    sd = model.state_dict()
    assert sd["shared.weight"].data_ptr() == sd["encoder.embed_tokens.weight"].data_ptr()
    torch.save(sd, tmp_path / "t5.bin")
    with open_checkpoint(tmp_path / "t5.bin") as ckpt:
        got = read_all(ckpt)
        assert_same(got, {k: v.clone() for k, v in sd.items()})
        assert torch.equal(got["shared.weight"], got["encoder.embed_tokens.weight"])
        assert any("shared.weight = encoder.embed_tokens.weight" in n for n in ckpt.notes)


@pytest.fixture(scope="module")
def ldm(tmp_path_factory):
    """An SD1.x-style all-in-one training checkpoint: LDM prefixes and LDM's dot-less model_ema names."""
    unet, unet_ema = (state_dict_tensors(build("unet_sd15", seed=s), dtype=None) for s in (0, 1))
    vae, clip = state_dict_tensors(build("vae"), dtype=None), state_dict_tensors(build("clip_text"), dtype=None)
    raw = {**{f"model.diffusion_model.{k}": v for k, v in unet.items()},
           **{f"first_stage_model.{k}": v for k, v in vae.items()},
           **{f"cond_stage_model.transformer.{k}": v for k, v in clip.items()}}
    ema = {f"model_ema.{('diffusion_model.' + k).replace('.', '')}": v for k, v in unet_ema.items()}
    ema.update({"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(1000, dtype=torch.int32)})
    path = tmp_path_factory.mktemp("ldm") / "sd15.ckpt"
    torch.save({"state_dict": {**raw, **ema}, "epoch": 3, "global_step": 1000}, path)
    with_ema = dict(raw, **{f"model.diffusion_model.{k}": v for k, v in unet_ema.items()})
    return path, raw, with_ema, len(unet)


def test_ldm_ema_left_out_by_default(ldm):
    path, raw, _, n_unet = ldm
    with open_checkpoint(path) as ckpt:
        assert_same(read_all(ckpt), raw)
        notes = " | ".join(ckpt.notes)
        assert f"EMA weights found (model_ema.*, {n_unet} tensors): raw weights used" in notes
        assert "pass --ema" in notes and "epoch=3, global_step=1000" in notes
        assert "all-in-one checkpoint: model.diffusion_model" in notes and "first_stage_model" in notes


def test_ldm_ema_mapped_onto_base_names(ldm):
    path, _, with_ema, n_unet = ldm
    with open_checkpoint(path, ema=True) as ckpt:
        assert_same(read_all(ckpt), with_ema)
        notes = " | ".join(ckpt.notes)
        assert f"EMA weights used (model_ema.*): {n_unet} tensors" in notes
        assert "model_ema.decay" in notes


def test_ema_prefix_in_safetensors_and_ema_wrapper_in_pickle(tmp_path, bert_sd):
    ema = {k: (v + 1 if v.is_floating_point() else v) for k, v in bert_sd.items()}
    save_file({**bert_sd, **{f"ema.{k}": v for k, v in ema.items()}}, str(tmp_path / "e.safetensors"))
    torch.save({"state_dict": bert_sd, "state_dict_ema": ema, "epoch": 1}, tmp_path / "timm.pth")
    for path, label in ((tmp_path / "e.safetensors", "ema.*"), (tmp_path / "timm.pth", "'state_dict_ema'")):
        with open_checkpoint(path) as ckpt:
            assert_same(read_all(ckpt), bert_sd)
            assert any("EMA weights found" in n and label in n for n in ckpt.notes)
        with open_checkpoint(path, ema=True) as ckpt:
            assert_same(read_all(ckpt), ema)
            assert any("EMA weights used" in n for n in ckpt.notes)


def test_ema_requested_but_absent(tmp_path, bert_sd):
    torch.save(bert_sd, tmp_path / "m.pt")
    with pytest.raises(UnsupportedInputError, match="no EMA weights") as info:
        open_checkpoint(tmp_path / "m.pt", ema=True)
    assert str(tmp_path / "m.pt") in str(info.value)


def test_ldm_dotless_names_that_collide_are_never_guessed():
    names = ["model.diffusion_model.a.1.1.w", "model.diffusion_model.a.11.w", "model_ema.diffusion_modela11w"]
    assert find_prefixed_ema(names) is None
    names.append("model_ema.diffusion_modelb")
    names.append("model.diffusion_model.b")
    _, mapping = find_prefixed_ema(names)
    assert mapping == {"model_ema.diffusion_modela11w": AMBIGUOUS, "model_ema.diffusion_modelb": "model.diffusion_model.b"}


def test_component_of():
    assert component_of("model.diffusion_model.input_blocks.0.0.weight") == ("model.diffusion_model",
                                                                             "input_blocks.0.0.weight")
    assert component_of("cond_stage_model.transformer.text_model.x") == ("cond_stage_model", "transformer.text_model.x")
    assert component_of("text_encoders.t5xxl.transformer.shared.weight") == ("text_encoders.t5xxl",
                                                                            "transformer.shared.weight")
    assert component_of("conditioner.embedders.0.transformer.w") == ("conditioner.embedders.0", "transformer.w")
    assert component_of("model.layers.0.w") == ("", "model.layers.0.w")


# ----------------------------------------------------------------------------- refusals

@pytest.fixture(scope="module")
def pickle_corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile_pickles")
    return folder, hostile_pickles.build_corpus(folder)


def test_pickle_corpus_is_large_enough():
    assert len(hostile_pickles.ATTACKS) >= 8


@pytest.mark.parametrize("attack", sorted(hostile_pickles.ATTACKS))
def test_hostile_pickle_refused(pickle_corpus, attack):
    folder, paths = pickle_corpus
    before = sha256(paths[attack])
    with pytest.raises(UnsupportedInputError) as info:
        open_checkpoint(paths[attack])
    message = str(info.value)
    assert paths[attack] in message and "\n" not in message
    if attack in hostile_pickles.PAYLOADS:
        assert "code execution" in message and "weights_only=True" in message
    assert not any(n.startswith("PWNED") for n in os.listdir(folder))
    assert sha256(paths[attack]) == before


def test_payload_would_really_run_if_unpickled(tmp_path):
    """The control: the same payload does create its marker under plain pickle (so the refusal above means something)."""
    import pickle
    data = hostile_pickles.attack_bytes(tmp_path, "raw_pickle_os_system")
    pickle.loads(data)
    assert os.path.exists(hostile_pickles.marker_path(tmp_path, "raw_pickle_os_system"))


def _index(folder, weight_map, name="model.safetensors.index.json", raw=None):
    path = folder / name
    path.write_bytes(raw if raw is not None else json.dumps({"metadata": {}, "weight_map": weight_map}).encode())
    return path


def _shard(folder, name, tensors):
    save_file(tensors, str(folder / name))


HOSTILE_INDEXES = {
    "shard_path_escapes_folder": ({"a": "../outside.safetensors"}, HeaderError, "not a file name inside"),
    "shard_path_absolute": ({"a": "/OUTSIDE/outside.safetensors"}, HeaderError, "not a file name inside"),
    "shard_in_sub_folder": ({"a": "sub/s1.safetensors"}, HeaderError, "not a file name inside"),
    "shard_missing": ({"a": "s1.safetensors", "b": "gone.safetensors"}, UnsupportedInputError, "missing"),
    "shard_not_safetensors": ({"a": "s1.txt"}, UnsupportedInputError, "not a .safetensors or .bin"),
    "tensor_in_two_shards": ({"a": "s1.safetensors", "b": "s2.safetensors"}, HeaderError, "in two shards"),
    "tensor_not_in_its_shard": ({"a": "s2.safetensors", "c": "s2.safetensors"}, HeaderError, "does not hold it"),
    "weight_map_values_not_strings": ({"a": 1}, HeaderError, "weight_map"),
    "index_not_json": (b"{not json", HeaderError, "not UTF-8 JSON"),
    "index_not_object": (b"[1, 2]", HeaderError, "weight_map"),
    "index_duplicate_key": (b'{"weight_map": {"a": "s1.safetensors", "a": "s2.safetensors"}}', HeaderError,
                            "duplicate key"),
    "index_empty_weight_map": ({}, UnsupportedInputError, "lists no tensors"),
}


@pytest.mark.parametrize("attack", sorted(HOSTILE_INDEXES))
def test_hostile_index_refused(tmp_path, attack):
    weight_map, error, match = HOSTILE_INDEXES[attack]
    model = tmp_path / "model"
    model.mkdir()
    _shard(tmp_path, "outside.safetensors", {"a": torch.ones(2)})     # would be read if the escape worked
    (model / "sub").mkdir()
    _shard(model / "sub", "s1.safetensors", {"a": torch.ones(2)})
    _shard(model, "s1.safetensors", {"a": torch.ones(2)})
    _shard(model, "s2.safetensors", {"a": torch.zeros(2), "b": torch.zeros(3)})
    (model / "s1.bin").write_bytes(b"")
    raw = weight_map if isinstance(weight_map, bytes) else None
    index = _index(model, None if raw else weight_map, raw=raw)
    for target in (index, model):
        with pytest.raises(error, match=match) as info:
            open_checkpoint(target)
        assert str(index) in str(info.value) and "\n" not in str(info.value)


def test_unlisted_tensors_in_shards_are_noted(tmp_path):
    _shard(tmp_path, "s1.safetensors", {"a": torch.ones(2), "extra": torch.zeros(1)})
    index = _index(tmp_path, {"a": "s1.safetensors"})
    with open_checkpoint(index) as ckpt:
        assert set(ckpt.tensors) == {"a", "extra"}
        assert any("1 tensors are in shards but not in the index" in n and "extra" in n for n in ckpt.notes)


def test_unusable_paths(tmp_path, bert_sd):
    (tmp_path / "empty").mkdir()
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    two = tmp_path / "two"
    two.mkdir()
    for n in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"):
        save_file({"a": torch.ones(1)}, str(two / n))
    shards_only = tmp_path / "shards_only"
    shards_only.mkdir()
    save_file({"a": torch.ones(1)}, str(shards_only / "model-00001-of-00002.safetensors"))
    cases = [("", "no input path"), (str(tmp_path / "missing.safetensors"), "does not exist"),
             (str(tmp_path / "empty"), "no weights in this folder"), (str(tmp_path / "model.gguf"), "unknown checkpoint"),
             (str(two), "2 candidate weight files"), (str(shards_only), "shards without")]
    for path, match in cases:
        with pytest.raises(UnsupportedInputError, match=match) as info:
            open_checkpoint(path)
        assert ".safetensors" in str(info.value)   # the hint (or the listing) says what is accepted
    save_file(bert_sd, str(tmp_path / "m.safetensors"))
    with pytest.raises(UnsupportedInputError, match="no component 'vae': this is not a diffusers pipeline"):
        open_checkpoint(tmp_path / "m.safetensors", component="vae")


def test_every_failure_is_a_quantkit_error_and_closes_files(tmp_path):
    _shard(tmp_path, "s1.safetensors", {"a": torch.ones(2)})
    index = _index(tmp_path, {"a": "s1.safetensors", "b": "s1.safetensors"})
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        with pytest.raises(QuantkitError):
            open_checkpoint(index)
    assert len(os.listdir("/proc/self/fd")) == fds


def test_sharded_pytorch_bin_checkpoint_and_safetensors_preferred(tmp_path):
    """Older Hub models: pytorch_model-0000i-of-0000N.bin with pytorch_model.bin.index.json."""
    model = build("llama")
    model.config.save_pretrained(tmp_path)
    want = state_dict_tensors(model, dtype=None)
    names = list(want)
    groups = [names[i::3] for i in range(3)]         # as transformers 4 wrote them (save_pretrained(safe_serialization=False))
    weight_map = {}
    for i, group in enumerate(groups, 1):
        shard = f"pytorch_model-{i:05d}-of-00003.bin"
        torch.save({k: want[k] for k in group}, tmp_path / shard)
        weight_map.update({k: shard for k in group})
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with open_checkpoint(tmp_path) as ckpt:
        assert ckpt.layout == "model-folder" and len(ckpt.files) == 3 and all(f.endswith(".bin") for f in ckpt.files)
        assert_same(read_all(ckpt), want)
    # the same folder with safetensors shards too: those are read, and the note says the .bin index is not
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    with open_checkpoint(tmp_path) as ckpt:
        assert all(f.endswith(".safetensors") for f in ckpt.files)
        assert any("pytorch_model.bin.index.json" in n for n in ckpt.notes)
