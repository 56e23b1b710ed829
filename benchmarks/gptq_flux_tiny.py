"""GPTQ vs round-to-nearest on a tiny diffusers FLUX (tests/tiny_models.py): model-output SQNR on
seeded inputs that calibration did not use (issue 23's bar).

Per model seed (the tiny model's weights): ``calibrate --rounding gptq`` on the default inputs
(latent seeds 0-1 x 4 timesteps), ``convert`` with ``--rounding nearest`` and ``--rounding gptq``
from those stats (the same scales), then ``validate --model-output``'s comparison
(``quantkit.model_output.compare_model_output``, weight-only) on input seeds 100-102.

    python benchmarks/gptq_flux_tiny.py --out-dir /tmp/qkgptq-flux --model-seeds 0,1,2 --json benchmarks/results-gptq-flux-tiny.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

INPUT_SEEDS = (100, 101, 102)


def measure(out_dir: pathlib.Path, model_seed: int, granularity: str) -> dict:
    from tiny_models import build, without_zero_layers
    from quantkit.calibration.collect import CalibrationSettings, calibrate
    from quantkit.model_output import compare_model_output
    from quantkit.options import ConvertOptions, Rounding
    from quantkit.quantize import convert
    from quantkit.sources import open_source
    work = out_dir / f"flux-{model_seed}-{granularity}"
    src = work / "src"
    if not (src / "config.json").exists():
        without_zero_layers(build("flux", model_seed)).save_pretrained(src)
    options = ConvertOptions.from_strings(granularity=granularity)
    stats = str(work / "s.stats.safetensors")
    calibrate(str(src), stats, options, CalibrationSettings(rounding=Rounding.GPTQ), overwrite=True)
    row = {"model_seed": model_seed, "granularity": granularity}
    for rounding in Rounding:
        out = str(work / f"flux-{rounding.value}.safetensors")
        convert(str(src), out, dataclasses.replace(options, rounding=rounding), stats=stats, overwrite=True)
        sqnrs = []
        with open_source(str(src)) as source:
            for seed in INPUT_SEEDS:
                sqnrs.append(compare_model_output(source, out, seed=seed, activations="none")["sqnr"])
        row[rounding.value] = sqnrs
    row["gain_db"] = [g - n for g, n in zip(row["gptq"], row["nearest"])]
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--model-seeds", default="0,1,2")
    ap.add_argument("--granularities", default="tensor,channel")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    rows = []
    for g in args.granularities.split(","):
        for seed in args.model_seeds.split(","):
            rows.append(measure(pathlib.Path(args.out_dir), int(seed), g))
            r = rows[-1]
            print(f"{g:8s} model seed {seed}: nearest {statistics.mean(r['nearest']):.2f} dB, gptq "
                  f"{statistics.mean(r['gptq']):.2f} dB, gain per input seed "
                  f"{', '.join(f'{x:+.2f}' for x in r['gain_db'])} dB", flush=True)
    summary = {}
    for g in args.granularities.split(","):
        gains = [x for r in rows if r["granularity"] == g for x in r["gain_db"]]
        summary[g] = {"gain_db_mean": statistics.mean(gains), "gain_db_min": min(gains), "gain_db_max": max(gains),
                      "runs": len(gains)}
        print(f"{g}: gain {statistics.mean(gains):+.2f} dB (min {min(gains):+.2f}, max {max(gains):+.2f}, "
              f"{len(gains)} model x input seeds)")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"input_seeds": INPUT_SEEDS, "rows": rows, "summary": summary},
                                                      indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
