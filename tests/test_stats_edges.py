"""Hand-edited and malformed stats files: `stats show` and `convert --stats` refuse each with exit 2
and one line naming the file and what is wrong, never a traceback (exit 3). Each case is a real
stats file edited the way a user (or a broken tool) would: its JSON metadata, its tensors, the file.
"""
import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from quantkit.calibration.stats import Stats, fingerprint, save
from quantkit.checkpoint import open_checkpoint
from quantkit.hashing import combined_digest, sha256_file
from runs import run

LAYERS = ("a.fc.weight", "b.fc.weight")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """(source checkpoint, a valid stats file of it with input ranges and layer figures)."""
    work = tmp_path_factory.mktemp("edges")
    src = work / "model.safetensors"
    g = torch.Generator().manual_seed(0)
    save_file({n: torch.randn(64, 32, generator=g).bfloat16() for n in LAYERS}, str(src))
    with open_checkpoint(str(src)) as f:
        fp, files = fingerprint(f.tensors), list(f.files)
        ranges = {n: f.read_tensor(f.tensors[n]).float().abs().amax() for n in LAYERS}
    stats = Stats(source={"name": "model.safetensors", "fingerprint": fp,
                          "sha256": combined_digest({p: sha256_file(p) for p in files})},
                  granularity="tensor", fp8="float8_e4m3fn", weight_observer="absmax", weights=ranges,
                  activations={n: torch.tensor(2.0) for n in LAYERS}, activation_observer="absmax", samples=4,
                  inputs="test", layers={n: {"input_absmax": 2.0, "input_rms": 0.5, "input_per_sample": False}
                                         for n in LAYERS})
    good = work / "good.stats"
    save(stats, str(good))
    return src, good


def meta_and_tensors(good):
    with safe_open(str(good), "pt") as f:
        meta = f.metadata()
    return meta, load_file(str(good))


def edit_doc(**changes):
    def edit(doc):
        for k, v in changes.items():
            if v is KeyError:
                del doc[k]
            else:
                doc[k] = v
        return doc
    return edit


def layer_figure(value):
    def edit(doc):
        doc["layers"][LAYERS[0]]["input_absmax"] = value
        return doc
    return edit


# name -> (how the file is edited, words the one-line error holds)
DOC_EDITS = {
    "missing source": (edit_doc(source=KeyError), "lacks 'source'"),
    "missing granularity": (edit_doc(granularity=KeyError), "lacks 'granularity'"),
    "fp8 of the wrong type": (edit_doc(fp8=5), "has fp8 5"),
    "unknown fp8": (edit_doc(fp8="float8_e3m4"), "has fp8 'float8_e3m4'"),
    "granularity of the wrong type": (edit_doc(granularity=["tensor"]), "has granularity ['tensor']"),
    "source a string": (edit_doc(source="model.safetensors"), "'source' that is not"),
    "source without sha256": (edit_doc(source={"name": "m"}), "'source' that is not"),
    "weight observer null": (edit_doc(weight_observer=None), "has weight_observer None"),
    "activation observer a number": (edit_doc(activation_observer=3), "has activation_observer 3"),
    "inputs an object": (edit_doc(inputs={"a": 1}), "has inputs"),
    "samples a string": (edit_doc(samples="eight"), "has samples 'eight'"),
    "samples negative": (edit_doc(samples=-3), "has samples -3"),
    "options a list": (edit_doc(options=[1]), "'options' that is not an object"),
    "layers a list": (edit_doc(layers=[1, 2]), "'layers' that is not"),
    "a layer a number": (edit_doc(layers={LAYERS[0]: 5}), "'layers' that is not"),
    "a figure a string": (layer_figure("big"), "= 'big': a number"),
    "version a string": (edit_doc(version="1"), "stats file version '1'"),
    "version missing": (edit_doc(version=KeyError), "stats file version None"),
    "not an object": (lambda doc: [doc], "stats file version None"),
}
RAW_EDITS = {
    "metadata not JSON": ("{not json", "is not JSON"),
    "a NaN figure": (None, "NaN is not a JSON number"),
    "an Infinity figure": (None, "Infinity is not a JSON number"),
    "deeply nested": ("[" * 100000 + "]" * 100000, "is not JSON"),
    "a number past float range": (None, "holds a number out of range"),
}
TENSOR_EDITS = {
    "a weight range of the wrong shape": (lambda t: t.update({"weight/" + LAYERS[0]: torch.ones(3, 3)}),
                                          "statistic shaped [3, 3]; a tensor scale is []"),
    "an input range of several values": (lambda t: t.update({"input/" + LAYERS[0]: torch.ones(3)}),
                                         "an input range is one value, not shaped [3]"),
    "a NaN range": (lambda t: t.update({"weight/" + LAYERS[1]: torch.tensor(float("nan"))}),
                    "a statistic is negative, NaN or Inf"),
    "a negative range": (lambda t: t.update({"input/" + LAYERS[1]: torch.tensor(-1.0)}),
                         "a statistic is negative, NaN or Inf"),
    "a float16 range": (lambda t: t.update({"weight/" + LAYERS[1]: torch.tensor(1.0, dtype=torch.float16)}),
                        "a statistic must be F32, not F16"),
    "a stray tensor": (lambda t: t.update({"extra": torch.ones(())}), "unexpected tensor in a stats file"),
}
FILES = {
    "an empty file": (b"", "too short for a safetensors header"),
    "a text file": (b"layer ranges:\n" * 20, "not a valid safetensors"),
}


def case_file(kind, name, good, path):
    meta, tensors = meta_and_tensors(good)
    if kind == "doc":
        edit, _ = DOC_EDITS[name]
        meta["quantkit.stats"] = json.dumps(edit(copy.deepcopy(json.loads(meta["quantkit.stats"]))))
    elif kind == "raw":
        raw, _ = RAW_EDITS[name]
        if raw is None:
            doc = json.loads(meta["quantkit.stats"])
            doc["layers"][LAYERS[0]]["input_absmax"] = "@@"
            raw = json.dumps(doc).replace('"@@"', {"a NaN figure": "NaN", "an Infinity figure": "Infinity"}.get(
                name, "1e400"))
        meta["quantkit.stats"] = raw
    elif kind == "tensors":
        edit, _ = TENSOR_EDITS[name]
        edit(tensors)
    else:
        path.write_bytes(FILES[name][0])
        return
    save_file(tensors, str(path), metadata=meta)


CASES = ([("doc", n, w) for n, (_, w) in DOC_EDITS.items()] + [("raw", n, w) for n, (_, w) in RAW_EDITS.items()]
         + [("tensors", n, w) for n, (_, w) in TENSOR_EDITS.items()] + [("file", n, w) for n, (_, w) in FILES.items()])


@pytest.mark.parametrize("kind,name,words", CASES, ids=[c[1] for c in CASES])
def test_a_broken_stats_file_is_one_line_exit_2(made, tmp_path, kind, name, words):
    src, good = made
    path = tmp_path / "edited.stats"
    case_file(kind, name, good, path)
    for args in (("stats", "show", path, "--json", tmp_path / "s.json"),
                 ("convert", src, tmp_path / "out.safetensors", "--preset", "generic", "--quantize", "*",
                  "--stats", path, "-q")):
        r = run(*args)
        errors = [x for x in r.output.splitlines() if x.startswith("error:")]
        assert r.exit_code == 2, (args[0], r.output)
        assert len(errors) == 1 and errors[0].startswith(f"error: {path}: ") and words in errors[0], errors
        assert "Traceback" not in r.output
    assert not (tmp_path / "out.safetensors").exists()


def test_the_unedited_file_shows_and_converts(made, tmp_path):
    src, good = made
    r = run("stats", "show", good, "--json", tmp_path / "s.json")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "s.json").read_text())["layers"]
    r = run("convert", src, tmp_path / "o.safetensors", "--preset", "generic", "--quantize", "*", "--stats", good, "-q")
    assert r.exit_code == 0 and "warning" not in r.output, r.output
