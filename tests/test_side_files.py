"""The seams a newcomer walks: one bounded JSON reader for every side file, one switch that quiets
transformers, a format's card text from its own object (adding a format = adding one file), and the
model builder that calibration and sensitivity use without the validation modules."""
import json
import os

import pytest

from quantkit.errors import UnsupportedInputError, ValidationFailed
from quantkit.jsonfiles import JSONFileError, parse_json, read_json


# ----------------------------------------------------------------------------- the JSON reader

def test_a_key_given_twice_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "side.json"
    path.write_text('{"a": 1, "b": {"c": 2, "c": 3}}')
    with pytest.raises(JSONFileError) as info:
        read_json(str(path))
    assert info.value.path == str(path) and info.value.duplicate == "c" and "duplicate key 'c'" in str(info.value)


def test_a_file_past_its_limit_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "big.json"
    path.write_text(json.dumps({"x": "y" * 200}))
    with pytest.raises(JSONFileError) as info:
        read_json(str(path), 100)
    assert info.value.size == os.path.getsize(path) and str(info.value) == "larger than 100 bytes"
    assert read_json(str(path), os.path.getsize(path)) == {"x": "y" * 200}      # the limit itself is allowed


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe{}", b"[" * 100_000 + b"]" * 100_000])
def test_broken_json_is_one_error(tmp_path, raw):
    path = tmp_path / "broken.json"
    path.write_bytes(raw)
    with pytest.raises(JSONFileError) as info:
        read_json(str(path))
    assert info.value.path == str(path) and isinstance(info.value, ValueError)


def test_a_missing_file_raises_its_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_json(str(tmp_path / "absent.json"))


def test_parse_constant_is_passed_through():
    def refuse(name):
        raise ValueError(f"{name} is not a JSON number")
    with pytest.raises(JSONFileError, match="NaN is not a JSON number"):
        parse_json('{"a": NaN}', "stats.safetensors", parse_constant=refuse)


def test_a_manifest_with_a_key_twice_is_refused(tmp_path):
    from quantkit.manifest import manifest_path, read_manifest
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"")
    with open(manifest_path(str(out)), "w") as f:
        f.write('{"files": {}, "files": {}}')
    with pytest.raises(ValidationFailed, match="manifest unreadable \\(duplicate key 'files'\\)"):
        read_manifest(str(out))


def test_a_config_with_a_key_twice_is_refused_naming_it(tmp_path):
    from quantkit.checkpoint import read_config
    path = tmp_path / "config.json"
    path.write_text('{"model_type": "bert", "model_type": "llama"}')
    with pytest.raises(UnsupportedInputError) as info:
        read_config(str(path))
    assert info.value.path == str(path) and "duplicate key 'model_type'" in info.value.message


def test_no_side_file_is_parsed_outside_the_reader():
    """json.load(s) on a file appears only in the reader (the safetensors header parser and a comfy
    marker's tensor bytes are not side files)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    allowed = {"quantkit/jsonfiles.py", "quantkit/reader.py", "quantkit/formats/comfy.py",
               "quantkit/publish/card.py", "quantkit/cli.py"}
    found = []
    for folder in ("quantkit", "calibration"):
        for d, _, files in os.walk(os.path.join(root, folder)):
            for f in files:
                rel = os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/")
                if f.endswith(".py") and rel not in allowed and "cli" not in rel.split("/")[:2]:
                    text = open(os.path.join(d, f), encoding="utf-8").read()
                    if "json.load(" in text or "json.loads(" in text:
                        found.append(rel)
    assert not found, found


# ----------------------------------------------------------------------------- quiet_transformers

def test_quiet_transformers_restores_the_level_and_the_bars():
    """Inside, transformers logs errors only and no tqdm bar draws, even one its caller asked for with
    disable=False (as compressed-tensors does); after, even after an error, both are as they were."""
    pytest.importorskip("transformers")
    import io

    import tqdm
    from transformers.utils import logging as hf_logging

    from quantkit.quiet import quiet_transformers

    def drawn(**kwargs) -> str:
        out = io.StringIO()
        for _ in tqdm.tqdm(range(3), file=out, desc="bar", **kwargs):
            pass
        return out.getvalue()
    before, init = hf_logging.get_verbosity(), tqdm.tqdm.__dict__["__init__"]
    with quiet_transformers():
        assert hf_logging.get_verbosity() == hf_logging.ERROR and "bar" in drawn()
    with pytest.raises(KeyError), quiet_transformers(no_bars=True):
        assert drawn() == "" and drawn(disable=False) == "" and not hf_logging.is_progress_bar_enabled()
        raise KeyError("an error inside still restores")
    assert hf_logging.get_verbosity() == before and tqdm.tqdm.__dict__["__init__"] is init and "bar" in drawn()
    assert hf_logging.is_progress_bar_enabled()


# ----------------------------------------------------------------------------- formats own their card text

def _prov(fmt: str) -> dict:
    return {"format": fmt, "base_model": [], "license": {}, "source_card": {"library_name": "lib", "pipeline_tag": "t"},
            "conversion": {"fp8": "float8_e4m3fn"}, "calibration": {"activations": None},
            "files": [{"name": "w.safetensors", "role": "weights"}],
            "versions": {"converted_with": {"quantkit": "9.9"}}}


def test_a_format_added_in_one_file_brings_its_card_text():
    from quantkit.formats.base import REGISTRY, OutputFormat, register
    from quantkit.publish.card import _loading, front_matter

    class Toy(OutputFormat):
        name = "toy-format-for-a-test"
        card_tags = ("toyui",)

        def card_library(self, source_card):
            return "toylib"

        def how_to_load(self, target, prov):
            return f"Drop `{target}` into ToyUI.\n"
    register(Toy)
    try:
        fields = front_matter(_prov(Toy.name))
        assert fields["library_name"] == "toylib" and fields["tags"][0] == "toyui" and "pipeline_tag" not in fields
        assert "Drop `w.safetensors` into ToyUI." in _loading(_prov(Toy.name))
    finally:
        del REGISTRY[Toy.name]


@pytest.mark.parametrize("fmt,library,tags,task", [
    ("native", "quantkit", [], None), ("comfy", None, ["comfyui"], None), ("comfy-legacy", None, ["comfyui"], None),
    ("compressed-tensors", "lib", ["compressed-tensors"], "t")])
def test_each_format_says_what_its_card_said(fmt, library, tags, task):
    from quantkit.publish.card import front_matter
    fields = front_matter(_prov(fmt))
    assert fields.get("library_name") == library and fields.get("pipeline_tag") == task
    assert fields["tags"] == [*tags, "fp8", "float8_e4m3fn", "quantized", "quantkit"]


def test_no_module_outside_formats_compares_format_names():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    names = ('"native"', '"comfy"', '"comfy-legacy"', '"compressed-tensors"')
    found = []
    for folder in ("quantkit", "calibration"):
        for d, _, files in os.walk(os.path.join(root, folder)):
            rel_dir = os.path.relpath(d, root).replace(os.sep, "/")
            if rel_dir.startswith(("quantkit/formats", "quantkit/testing")):
                continue
            for f in files:
                if f.endswith(".py"):
                    for number, line in enumerate(open(os.path.join(d, f), encoding="utf-8"), 1):
                        if any(f"== {n}" in line or f"{n}:" in line.replace(" ", "") for n in names):
                            found.append(f"{rel_dir}/{f}:{number}")
    assert not found, found


# ----------------------------------------------------------------------------- models without validation

def test_calibration_and_sensitivity_build_models_without_the_validation_modules():
    from test_import_graph import imports, modules
    found = modules()
    known = set(found)
    for name in ("quantkit.sensitivity", "quantkit.calibration.inputs", "quantkit.calibration.activations",
                 "quantkit.calibration.collect"):
        targets = imports(name, found[name], known)
        assert "quantkit.model_output" not in targets and "quantkit.validation" not in targets, name
    assert "quantkit.models" in imports("quantkit.sensitivity", found["quantkit.sensitivity"], known)
