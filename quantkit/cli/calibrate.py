"""Commands of the calibrate stage: calibrate, stats show."""
from __future__ import annotations

import sys

import click

from . import render
from .group import main, progress_bars
from .options import (PATTERN_HELP, _RuleOrderCommand, check_report_dir, compute_dtype_option, convert_options,
                      json_option, max_memory_option, overwrite_option, policy_options, quiet_option, report_option,
                      reports)


@main.command(cls=_RuleOrderCommand, epilog=PATTERN_HELP)
@click.argument("src", type=click.Path())
@policy_options
@click.option("-o", "--output", "out", type=click.Path(dir_okay=False), required=True, metavar="STATS",
              help="The stats file to write (safetensors), e.g. model.stats.safetensors.")
@click.option("--observer", "weight_observer", default="absmax", show_default=True, metavar="NAME",
              help="Weight statistic: absmax, mse (the clipped range with the least FP8 round-trip error, per "
                   "scale group) or percentile[:Q] (per tensor; Q default 99.99).")
@click.option("--activation-observer", default="absmax", show_default=True, metavar="NAME",
              help="Input statistic, per tensor over all passes: absmax (running max), ema[:M] (moving average "
                   "of each pass's absmax, momentum M default 0.9) or percentile[:Q] (max over passes).")
@click.option("--inputs", default="builtin", show_default=True, metavar="builtin|MODULE:FUNCTION",
              help="Calibration inputs: builtin (transformers models: quantkit's sentence set through the "
                   "tokenizer in the model's folder; diffusers models: seeded latents over --steps x --seeds), "
                   "or a function (module:function or path/file.py:function) returning an iterable of "
                   "keyword-input dicts, one per forward pass.")
@click.option("--text-encoder", "text_encoders", multiple=True, type=click.Path(file_okay=False), metavar="PATH",
              help="Diffusers models: a transformers text encoder folder (with its tokenizer) whose embeddings "
                   "of the prompt set condition the passes, matched to the model's inputs by width (FLUX: T5 "
                   "sequence + CLIP pooled). Repeatable. Default: seeded embeddings.")
@click.option("--steps", type=click.IntRange(min=1), default=4, show_default=True,
              help="Diffusers models: timesteps per seed, evenly spread over the schedule.")
@click.option("--seeds", type=click.IntRange(min=1), default=2, show_default=True,
              help="Diffusers models: seeds of the latents (samples = steps x seeds, 16 per pass).")
@click.option("--samples", type=click.IntRange(min=1), metavar="N",
              help="At most N calibration samples: sentences (32 per pass), diffusion rows (16 per pass), or the "
                   "hook's items (one pass each). Streamed mode reads the model once per pass.")
@click.option("--weights-only", is_flag=True, help="Weight statistics only; do not run the model.")
@click.option("--rounding", type=click.Choice(["nearest", "gptq"]), default="nearest", show_default=True,
              help="gptq: also gather each quantized linear's input Hessian (sum of x x^T) into a sidecar beside "
                   "STATS (STATS without .safetensors + .hessians.safetensors), for 'convert --rounding gptq'.")
@compute_dtype_option("The dtype the model computes in while its inputs are observed.")
@max_memory_option("Keep as many blocks of the model in memory as SIZE holds (e.g. 8GB) and stream the rest from "
                   "the file while its inputs are observed (default: one block at a time: each pass reads the "
                   "whole checkpoint).")
@json_option("Also write the summary as JSON to PATH.")
@overwrite_option("Replace STATS (and the --json file) if they exist.")
@quiet_option()
@click.pass_context
def calibrate(ctx, src, out, weight_observer, activation_observer, inputs, text_encoders, steps, seeds, samples,
              weights_only, rounding, compute_dtype, max_memory, json_path, overwrite, quiet, **policy):
    """Measure SRC's weights and layer inputs into the stats file STATS, for 'convert --stats'.

    Same policy options as 'convert': the tensors observed are those it would quantize. Each weight
    is read alone (memory: one tensor). When a config.json lies beside the weights, the model runs
    through quantkit's runtime in streamed mode (one block of weights in memory at a time) on the
    calibration inputs, and the input of every quantized layer is observed. The stats record the
    source's SHA256: convert refuses stats of another checkpoint.

    \b
    Examples:
      quantkit calibrate ./all-MiniLM-L6-v2 -o minilm.stats.safetensors --observer mse --granularity channel
      quantkit calibrate ./FLUX.1-dev --component transformer -o flux.stats.safetensors
        --text-encoder ./FLUX.1-dev/text_encoder --text-encoder ./FLUX.1-dev/text_encoder_2
      quantkit stats show flux.stats.safetensors
    """
    from ..calibration.collect import CalibrationSettings
    from ..calibration.collect import calibrate as measure
    progress = progress_bars(quiet)
    options = convert_options(ctx, **policy)
    settings = CalibrationSettings(weight_observer=weight_observer, activation_observer=activation_observer,
                                   inputs=inputs, text_encoders=tuple(text_encoders), steps=steps, seeds=seeds,
                                   samples=samples, weights_only=weights_only, compute_dtype=compute_dtype,
                                   max_memory=max_memory, rounding=rounding)
    click.echo(f"quantkit calibrate: {src} -> {out}")
    result = measure(src, out, options, settings, overwrite=overwrite, progress=progress, reports=reports(json_path))
    render.calibration(result, out, _peak_rss())
    if json_path:
        render.write_json(json_path, result.to_dict())


@main.group()
def stats():
    """Read stats files written by 'quantkit calibrate'."""


@stats.command("show")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--top", type=click.IntRange(min=0), default=20, show_default=True, help="How many layers to list.")
@click.option("--sort", type=click.Choice(["range", "outlier"]), default="range", show_default=True,
              help="List the largest input ranges first, or the largest outlier ratios (absmax / RMS).")
@json_option("Write every layer as JSON to PATH.")
@report_option("Also write DIR/report.md with a PNG chart of every layer's weight and input range, and "
               "report.json (needs matplotlib).")
@overwrite_option("Replace the --json file or --report folder if it exists.")
def stats_show(path, top, sort, json_path, report_dir, overwrite):
    """Show what the stats file PATH holds: its source, observers, and each layer's ranges.

    An outlier ratio (absmax / RMS) says how far a layer's largest value sits above its typical
    one: large ratios are what a per-tensor FP8 scale represents worst.
    """
    from ..calibration.collect import layer_table
    from ..calibration.stats import load
    from ..destinations import check_report_path
    for option, report_path in reports(json_path).items():
        check_report_path(report_path, option, reads=[path], overwrite=overwrite)
    if report_dir:
        check_report_dir(report_dir, [path], overwrite)
    s = load(path)
    rows = layer_table(s, sort)
    render.stats_file(path, s, rows, top, sort)
    if json_path:
        render.write_json(json_path, {"path": path, **s.describe(), "source": s.source, "options": s.options,
                                      "layers": rows})
    if report_dir:
        from ..report import stats_report
        render.report_folder(report_dir, stats_report(s, rows, report_dir))


def _peak_rss() -> int | None:
    """This process's peak resident memory in bytes (Linux / macOS), or None where it cannot be told."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024        # macOS: bytes; Linux: KiB
