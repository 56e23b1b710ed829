"""Commands that check: validate, sensitivity, check-math."""
from __future__ import annotations

import os
import sys

import click

from . import render
from .group import main, progress_bars
from .options import (DECIBELS, GRANULARITIES, PATTERN_HELP, _RuleOrderCommand, _Tolerance, activations_option,
                      check_report_dir, compute_dtype_option, convert_options, jobs_option, json_option,
                      max_memory_option, overwrite_option, policy_options, quiet_option, report_option, reports)


@main.command()
@click.argument("out", type=click.Path())
@click.option("--against", "against", type=click.Path(),
              help="The source checkpoint: measure every tensor against it.")
@click.option("--min-sqnr", type=DECIBELS, metavar="DB",
              help="Fail if any tensor's SQNR is below DB decibels (needs --against). Replaces the default "
                   "sanity floor: an FP8 tensor fails 3 dB under the least SQNR round-to-nearest with its own "
                   "absmax scale gives its data (about 21 dB in E4M3).")
@json_option("Write the full report as JSON to PATH.")
@report_option("Also write DIR/report.md with PNG charts (per-tensor SQNR by depth, the model's output) "
               "and report.json (needs matplotlib).")
@overwrite_option("Replace the --json file or --report folder if it exists.")
@click.option("--no-hash-check", is_flag=True, help="Skip the SHA256 check (for files without a manifest).")
@click.option("--show", type=click.IntRange(min=0), default=5, show_default=True,
              help="How many worst tensors to list.")
@click.option("--component", metavar="NAME",
              help="Pipeline folder source: the component compared (default: the one recorded in the manifest).")
@click.option("--ema/--no-ema", default=None,
              help="Compare with the source's EMA / raw weights (default: as recorded in the manifest).")
@click.option("--model-output", is_flag=True,
              help="Also run the source model and the quantized one (transformers or diffusers models, built "
                   "from the config.json beside the source) on the same seeded random inputs (token ids; latents, "
                   "timesteps and text embeddings) and compare their outputs. Each model runs streamed, one block "
                   "in memory at a time, so models larger than the machine's memory validate too.")
@click.option("--heldout", is_flag=True,
              help="Also run both models on quantkit's fixed held-out set (72 sentences of 1-40+ words in 12 "
                   "languages and code, none from the calibration set; 24 seeded latents/timesteps/text embeddings "
                   "for a diffusers model, seeds never used by calibrate) and report per input the output cosine and "
                   "SQNR: mean, p5, p1 and min, with their spread over 3 disjoint seeded thirds of the set (a "
                   "difference inside it is noise). Implies --model-output.")
@compute_dtype_option("With --model-output: the dtype both models compute in (bf16 halves what a block holds).")
@max_memory_option("With --model-output: keep as many blocks of each model in memory as SIZE holds (e.g. 8GB) and "
                   "stream the rest from the file (default: one block at a time; a SIZE below one block is refused "
                   "with the smallest that works).")
@click.option("--min-output-sqnr", type=DECIBELS, metavar="DB",
              help="With --model-output: fail if the weight-only output's SQNR (what every client computes) is "
                   "below DB decibels (implies --model-output).")
@activations_option("With --model-output: rows that simulate FP8 activation quantization on CPU (inputs of FP8 "
                    "Linears -> E4M3 and back), besides weight-only; each is one more streamed run of the quantized "
                    "model. file: W8A8 as the file implies (its static input_scales; ComfyUI's 1.0 for a comfy layer "
                    "with neither input_scale nor full_precision_matrix_mult), not run when the file implies none; "
                    "all: also W8A8 with scale 1.0 (ComfyUI without input_scale, when the file has static scales) "
                    "and W8A8 dynamic per token; none: weight-only.")
@click.option("--min-w8a8-sqnr", type=DECIBELS, metavar="DB",
              help="Fail if the output's SQNR with W8A8 as the file implies is below DB decibels (implies "
                   "--model-output and --activations file or all).")
@quiet_option()
@jobs_option("Processes sharing the work: each file's SHA256 computed by one of them, the tensors compared "
             "in groups; the report is the same whatever N. Default: as many as the cores and the free "
             "memory (0.5 GB a job) allow, with 3 cores or more and files of 1 GB or more; else 1 (one "
             "process, the SHA256s on threads beside the comparison: as fast on 2 cores, half the memory). "
             "A larger N than the cores and the free memory allow is capped there, with a note.")
def validate(out, against, min_sqnr, json_path, report_dir, overwrite, no_hash_check, show, component, ema,
             model_output, heldout, compute_dtype, max_memory, min_output_sqnr, activations, min_w8a8_sqnr, quiet,
             jobs):
    """Prove OUT is intact and faithful to its source.

    Recomputes the SHA256 of OUT (and of the source) and compares them with the manifest
    written by 'quantkit convert'; with --against, dequantizes every tensor (W = q * scale) and
    reports PSNR, SQNR and cosine per tensor, then min / median and the worst tensors.

    Exit code 0 when everything checks out, 1 when validation fails (hash mismatch, missing
    tensor, an FP8 tensor below its sanity floor or, when given, SQNR below --min-sqnr), 2 when
    the arguments are unusable.

    \b
    Example:
      quantkit validate model-fp8.safetensors --against model.safetensors --min-sqnr 30 --json report.json
    """
    from ..errors import QuantkitError
    from ..options import ValidateOptions
    from ..validation import validate as run
    progress = progress_bars(quiet)
    model_output = model_output or min_w8a8_sqnr is not None or heldout
    if (model_output or min_output_sqnr is not None) and not against:
        raise QuantkitError("--model-output compares with the source model", hint="pass --against SRC")
    if max_memory is not None and not (model_output or min_output_sqnr is not None):
        raise QuantkitError("--max-memory sizes the models --model-output runs", hint="add --model-output, or leave "
                                                                                     "--max-memory out")
    if min_sqnr is not None and not against:
        raise QuantkitError("--min-sqnr measures the output against its source", hint="pass --against SRC")
    if report_dir:
        check_report_dir(report_dir, [out, against], overwrite)
    click.echo(f"quantkit validate: {out}" + (f" against {against}" if against else ""))
    options = ValidateOptions(min_sqnr=min_sqnr, check_hash=not no_hash_check, component=component, ema=ema,
                              model_output=model_output, min_output_sqnr=min_output_sqnr, compute_dtype=compute_dtype,
                              max_memory=max_memory,
                              activations=activations, min_w8a8_sqnr=min_w8a8_sqnr, heldout=heldout)
    report = run(out, against, options, progress=progress, reports=reports(json_path), overwrite_reports=overwrite,
                 jobs=jobs)
    render.validation(report, show)
    if json_path:
        render.write_json(json_path, report.to_dict())
    if report_dir:
        render.charts("validation_report", report, report_dir)
    sys.exit(0 if report.ok else 1)


@main.command(cls=_RuleOrderCommand, epilog=PATTERN_HELP)
@click.argument("src", type=click.Path())
@policy_options
@click.option("--target-sqnr", type=DECIBELS, metavar="DB",
              help="Propose the layers to keep so that the model's output reaches DB decibels.")
@click.option("--show", type=click.IntRange(min=0), default=10, show_default=True, help="How many layers to list.")
@max_memory_option("Run the model within SIZE (e.g. 8GB): as many of its blocks in memory as SIZE holds, the "
                   "rest read from SRC as they run (without it the model is held whole in float32).")
@json_option("Write the ranking as JSON to PATH.")
@report_option("Also write DIR/report.md with a PNG chart of the ranking and report.json (needs matplotlib).")
@overwrite_option("Replace the --json file or --report folder if it exists.")
@quiet_option()
@click.pass_context
def sensitivity(ctx, src, target_sqnr, show, max_memory, json_path, report_dir, overwrite, quiet, **policy):
    """Rank the layers of SRC by how much quantizing each alone costs the model's output.

    Same options as 'convert' (the layers ranked are those it would quantize: pass --recipe compact
    to rank the attention projections too). Each layer is quantized alone as convert writes it, the
    model (built from the config.json beside SRC) runs on the seeded inputs of 'validate
    --model-output', and its output is compared with the original's. --target-sqnr proposes the
    layers to keep (worst first, re-measured each time) for the whole plan to reach DB. The model
    is held in float32 (for models that fit in memory), or run within --max-memory.

    \b
    Example:
      quantkit sensitivity ./all-MiniLM-L6-v2 --recipe compact --target-sqnr 25
    """
    from ..destinations import check_report_path
    from ..sensitivity import sensitivity as rank
    progress = progress_bars(quiet)
    options = convert_options(ctx, **policy)
    for option, report_path in reports(json_path).items():
        check_report_path(report_path, option, reads=[src], overwrite=overwrite)
    if report_dir:
        check_report_dir(report_dir, [src], overwrite)
    click.echo(f"quantkit sensitivity: {src}")
    report = rank(src, options, target_sqnr=target_sqnr, max_memory=max_memory, progress=progress)
    render.sensitivity(report, show)
    if json_path:
        render.write_json(json_path, report.to_dict())
    if report_dir:
        render.charts("sensitivity_report", report, report_dir)


@main.command("check-math")
@click.argument("quantizer", metavar="MODULE:FUNCTION")
@click.option("--granularity", type=click.Choice(GRANULARITIES), default="tensor", show_default=True,
              help="The scale FUNCTION returns: [] per tensor, [out, 1] per channel, [ceil(out/128), "
                   "ceil(in/128)] per 128x128 block.")
@click.option("--scale", "scale_rule", type=click.Choice(["absmax", "any"]), default="absmax", show_default=True,
              help="absmax: each scale must be absmax / 448. any: a calibrated or clipping scale; only the "
                   "codes for it and the round trip are checked.")
@click.option("--scale-rtol", type=_Tolerance(), metavar="R",
              help="Relative tolerance of a scale against absmax / 448 [default: 2^-20, float32 rounding]; "
                   "0.004 accepts bf16-rounded scales.")
@click.option("--examples", type=click.IntRange(min=0), default=0, show_default=True, metavar="N",
              help="Also try N weights drawn by hypothesis; a failing one is shrunk to the simplest.")
def check_math(quantizer, granularity, scale_rule, scale_rtol, examples):
    """Check someone's FP8 (E4M3) weight quantizer against an independent reference.

    FUNCTION(x) takes a 2-D bf16/fp16/fp32 tensor and returns (codes, scale): codes
    float8_e4m3fn of x's shape, scale float32, with x ~ codes * scale. A battery of weights
    (Gaussian, outliers, every bit pattern, ties, subnormals, tiny, all-zero rows and tiles,
    edge tiles, 0 rows) finds the usual bugs by name: absmax over 127, no clamp, round-toward-zero,
    float16 scales, NaN for zero scale, ignored edge tiles. Exit 0: correct; 1: a bug,
    named in one line; 2: MODULE:FUNCTION cannot be loaded.

    \b
    Example:
      quantkit check-math mypkg.fp8:quantize_weight --granularity channel
    """
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())   # as `python -m` does: modules in the current folder are found
    from ..testing import QuantizerCheckFailed, QuantizerSpecError, check_quantizer, load_quantizer
    try:
        fn = load_quantizer(quantizer)
    except QuantizerSpecError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    try:
        tolerance = {} if scale_rtol is None else {"scale_rtol": scale_rtol}
        report = check_quantizer(fn, granularity, scale_rule=scale_rule, examples=examples, **tolerance)
    except QuantizerCheckFailed as exc:
        click.echo(f"FAIL {quantizer} --granularity {granularity}: {exc}")
        sys.exit(1)
    click.echo(f"{quantizer} --granularity {granularity}: {report.summary()}")
