"""The ``quantkit`` command: a thin click shell over the library.

Nothing heavy is imported at module level, so ``quantkit --help`` answers without loading torch.
Exit codes: 0 success, 1 validation failed, 2 bad input or usage (out of memory included), 3 an
internal error (a bug: its traceback is printed), 130 / 143 Ctrl-C / SIGTERM.
"""
from __future__ import annotations

import json
import os
import sys

import click

from .dtypes import FP8_FORMATS, Granularity
from .options import KeepDtype, Recipe

GRANULARITIES = tuple(g.value for g in Granularity)
KEEP_DTYPES = tuple(k.value for k in KeepDtype)
FP8_DTYPES = tuple(FP8_FORMATS)
RECIPES = tuple(r.value for r in Recipe)

PATTERN_HELP = """\b
Policy rules (--quantize / --keep, repeatable) are applied in the order given and the LAST
rule that matches a tensor wins, so put general rules first and exceptions after them.
A pattern is a glob matched against the whole key or the layer name (the key without
'.weight'); '*' also crosses dots. With a 're:' prefix it is a Python regular expression
that must match the key or layer name in full.
\b
  --keep '*.attn.*'                         keep every tensor under an 'attn' module
  --quantize '*' --keep 'transformer_blocks.0.*'   quantize all matrices except block 0
  --quantize 're:.*\\.attn\\d\\.to_[qkv]'       quantize attention q/k/v projections
Only weights with two or more dimensions can be quantized; a --quantize rule that matches
a bias or norm is ignored with a warning."""


class _Decibels(click.ParamType):
    """A finite number of decibels (a quality bar of nan or inf would pass or fail everything)."""

    name = "decibels"

    def convert(self, value, param, ctx):
        import math
        try:
            db = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of decibels (e.g. 30)", param, ctx)
        if not math.isfinite(db):
            self.fail(f"{value!r} is not a finite number of decibels (e.g. 30)", param, ctx)
        return db


DECIBELS = _Decibels()


class _Tolerance(click.ParamType):
    """A finite number >= 0 (NaN compares false with everything: it would fail every check)."""

    name = "tolerance"

    def convert(self, value, param, ctx):
        import math
        try:
            r = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number (e.g. 0.004)", param, ctx)
        if not (math.isfinite(r) and r >= 0):
            self.fail(f"{value!r} is not a finite number >= 0 (e.g. 0.004)", param, ctx)
        return r


class _RuleOrderCommand(click.Command):
    """Records --quantize/--keep in command-line order (click groups repeated options per name)."""

    def parse_args(self, ctx, args):
        rules, i = [], 0
        while i < len(args):
            a = args[i]
            if a == "--":
                break
            for action in ("quantize", "keep"):
                flag = f"--{action}"
                if a == flag and i + 1 < len(args):
                    rules.append((action, args[i + 1]))
                    i += 1
                elif a.startswith(flag + "="):
                    rules.append((action, a[len(flag) + 1:]))
            i += 1
        ctx.meta["quantkit.rules"] = rules
        return super().parse_args(ctx, args)


def _policy_options(f):
    options = [
        click.option("--granularity", type=click.Choice(GRANULARITIES), default=None,
                     help="Scale per tensor (default), per output channel, or per 128x128 block. "
                          "An FP8 source keeps its own."),
        click.option("--format", "fmt", default="native", show_default=True, metavar="NAME",
                     help="Output format (list them with 'quantkit formats')."),
        click.option("--fp8-dtype", type=click.Choice(FP8_DTYPES), default=None,
                     help="FP8 encoding of quantized weights: float8_e4m3fn (default) or float8_e5m2. "
                          "An FP8 source keeps its own."),
        click.option("--preset", default="auto", show_default=True, metavar="NAME",
                     help="Architecture policy; 'auto' detects it from the keys (list with 'quantkit presets')."),
        click.option("--recipe", type=click.Choice(RECIPES), default="mixed", show_default=True,
                     help="mixed: attention projections and norms stay BF16, feed-forward and modulation "
                          "linears become FP8; compact: attention FP8 too (about 10% smaller, less faithful)."),
        click.option("--quantize", "quantize_rules", multiple=True, metavar="PATTERN",
                     help="Quantize tensors matching PATTERN (repeatable; see rules below)."),
        click.option("--keep", "keep_rules", multiple=True, metavar="PATTERN",
                     help="Keep tensors matching PATTERN in high precision (repeatable)."),
        click.option("--keep-dtype", type=click.Choice(KEEP_DTYPES), default="bf16", show_default=True,
                     help="Precision of the floating-point tensors that are not quantized."),
        click.option("--quantize-conv", is_flag=True, help="Also quantize convolution kernels (kept by default)."),
        click.option("--allow-nonfinite", is_flag=True,
                     help="Quantize tensors holding NaN/Inf (NaN stays NaN, Inf saturates) instead of failing."),
        click.option("--comfy-header-metadata", is_flag=True,
                     help="Format comfy: also write the _quantization_metadata header entry."),
        click.option("--component", metavar="NAME",
                     help="Convert one component: of a diffusers pipeline folder (transformer, text_encoder_2, ...) "
                          "or of an all-in-one checkpoint (model.diffusion_model or unet, first_stage_model or vae, "
                          "cond_stage_model or text_encoder, ...; its prefix is removed)."),
        click.option("--ema", is_flag=True,
                     help="Convert the EMA copy of the weights when the checkpoint holds raw and EMA weights."),
        click.option("--max-shard-size", metavar="SIZE",
                     help="Write a sharded output (DST becomes a folder with model.safetensors.index.json), "
                          "each shard at most SIZE, e.g. 5GB or 500MB."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _options(ctx, *, granularity, fmt, fp8_dtype, preset, recipe, keep_dtype, quantize_conv, allow_nonfinite,
             comfy_header_metadata, component, ema, max_shard_size, quantize_rules=(), keep_rules=()):
    """ConvertOptions from the shared options (--quantize/--keep come in command-line order from ctx)."""
    from .options import ConvertOptions
    return ConvertOptions.from_strings(granularity=granularity, fp8=fp8_dtype, format=fmt, keep_dtype=keep_dtype,
                                       rules=ctx.meta.get("quantkit.rules", []), quantize_conv=quantize_conv,
                                       allow_nonfinite=allow_nonfinite, preset=preset,
                                       comfy_header_metadata=comfy_header_metadata, component=component, ema=ema,
                                       max_shard_size=max_shard_size, recipe=recipe)


def _stats_options(f):
    """convert / plan: --stats and --force-stats."""
    f = click.option("--force-stats", is_flag=True,
                     help="Use --stats calibrated on another checkpoint (a warning instead of a refusal).")(f)
    return click.option("--stats", "stats_path", type=click.Path(dir_okay=False), metavar="STATS",
                        help="A stats file from 'quantkit calibrate' of this checkpoint: weight scales from its "
                             "ranges, and static activation scales (input_scale) where the format has a place "
                             "for them. Granularity and FP8 dtype default to the stats'.")(f)


def _reports(json_path: str | None) -> dict[str, str]:
    """The report files a command writes at its end, by option (checked before any work)."""
    return {"--json": json_path} if json_path else {}


def _fail(exc) -> None:
    _stopped(_interrupt_behind(exc))
    click.echo(f"error: {exc}", err=True)
    sys.exit(exc.exit_code)


def _write_json(path: str, doc: dict) -> None:
    from .writer import write_atomic
    write_atomic(path, (json.dumps(doc, indent=2, allow_nan=False) + "\n").encode())


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


class _Bars:
    """tqdm bars for the library's Progress callbacks (silent when not a terminal or --quiet)."""

    def __init__(self, quiet: bool):
        from tqdm import tqdm

        from .progress import Progress

        class Bars(Progress):
            bar = None

            def stage(self, name, total_bytes):
                self.close()
                self.bar = tqdm(total=total_bytes, desc=f"{name:>9}", unit="B", unit_scale=True,
                                disable=True if quiet else None, leave=False, file=sys.stderr)

            def advance(self, nbytes):
                if self.bar is not None:
                    self.bar.update(nbytes)

            def close(self):
                if self.bar is not None:
                    self.bar.close()
                    self.bar = None

            def warn(self, message):
                click.echo(f"warning: {message}", err=True)

        self.progress = Bars()


INTERNAL_ERROR = 3      # a bug: neither 1 (validation failed) nor 2 (bad input)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a job scheduler, ``kill``), raised where Ctrl-C would be so the same cleanup runs."""


class _Group(click.Group):
    """Ctrl-C and SIGTERM end a command with one line and exit 130 / 143 (click alone prints
    "Aborted!" and exits 1, which quantkit uses for a failed validation). The exception unwinds
    through the writer first, which removes its temporary files: nothing half-written remains."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:      # one line, like every other refusal (click prints three)
            where = f"{ctx.command_path} {exc.ctx.info_name}" if exc.ctx is not None and exc.ctx is not ctx \
                else ctx.command_path
            click.echo(f"error: {exc.format_message()} (see '{where} --help')", err=True)
            raise click.exceptions.Exit(exc.exit_code) from None
        except KeyboardInterrupt as exc:
            _stopped(exc)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except MemoryError:
            click.echo("error: out of memory (convert streams in any case; for validate --model-output, the model "
                       "must fit: validate per tensor, without --model-output, or on a machine with more memory)",
                       err=True)
            raise click.exceptions.Exit(2) from None
        except Exception as exc:      # noqa: BLE001 -- a bug, not bad input: the traceback is for the report
            _stopped(_interrupt_behind(exc))
            if "not enough memory" in str(exc):          # torch's allocator: "you tried to allocate N bytes"
                click.echo(f"error: out of memory: {str(exc).strip().splitlines()[0][:300]} (validate per tensor, "
                           "without --model-output, or use a machine with more memory)", err=True)
                raise click.exceptions.Exit(2) from None
            import traceback
            traceback.print_exc()
            click.echo(f"internal error (a bug in quantkit, not in your files): {type(exc).__name__}: {exc}; "
                       "please report it with the traceback above", err=True)
            raise click.exceptions.Exit(INTERNAL_ERROR) from None


def _stopped(exc: KeyboardInterrupt | None) -> None:
    """Ctrl-C or SIGTERM: one line and exit 130 / 143 (nothing when ``exc`` is None)."""
    if exc is None:
        return
    what, code = ("terminated", 143) if isinstance(exc, Terminated) else ("interrupted", 130)
    click.echo(f"{what}: stopped; nothing half-written is left under the output's name", err=True)
    raise click.exceptions.Exit(code) from None


def _interrupt_behind(exc: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C / SIGTERM an error was raised from: a C extension whose start-up the signal
    interrupted (scipy's, imported by transformers) reports "ImportError: initialization failed"
    caused by it, which is no bug of quantkit's."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="quantkit")
def main():
    """quantkit: FP8 (E4M3) checkpoints that are half the size of BF16 and provably faithful.

    \b
    Typical use:
      quantkit plan model.safetensors                      # what would happen, tensor by tensor
      quantkit convert model.safetensors model-fp8.safetensors
      quantkit validate model-fp8.safetensors --against model.safetensors --min-sqnr 30
    """


@main.command(cls=_RuleOrderCommand, epilog=PATTERN_HELP)
@click.argument("src", type=click.Path())
@click.argument("dst", type=click.Path())
@_policy_options
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the summary as JSON to PATH.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@click.option("--jobs", "-j", type=click.IntRange(min=1), metavar="N",
              help="Processes converting the shards of a sharded output (--max-shard-size) side by side, "
                   "each streaming; the output is the same whatever N. Default: as many as the cores and "
                   "the free memory (0.5 GB a job) allow; 1 with 2 cores or fewer (one process keeps two busy). "
                   "A larger N is capped there (and at the pieces of work), with a note.")
@_stats_options
@click.pass_context
def convert(ctx, src, dst, overwrite, json_path, quiet, jobs, stats_path, force_stats, **policy):
    """Quantize the checkpoint SRC into DST.

    SRC is a .safetensors file, a sharded checkpoint (its *.safetensors.index.json or its
    folder), a diffusers model folder, a diffusers pipeline folder with --component, or a
    PyTorch pickle (.ckpt/.pt/.pth/.bin, loaded with torch.load(weights_only=True) only: a
    pickle that would run code is refused).

    Linear-layer weights become FP8 with scales, as the architecture's preset decides (for a
    model no preset knows, attention projections stay in high precision too); norms,
    embeddings, biases and other vectors stay in high precision (--keep-dtype); non-float
    tensors are copied untouched. Check the decisions first with 'quantkit plan'.

    For ComfyUI (--format comfy), a diffusers FLUX.1 / SD3 transformer or SD/SDXL UNet is
    written under the original releases' names, which ComfyUI loads with its scales.

    The output is streamed tensor by tensor (memory does not grow with the checkpoint), written
    under a temporary name and renamed when complete; its SHA256 goes to DST's manifest
    (DST without '.safetensors' + '.quantkit.json'), which 'quantkit validate' checks.

    \b
    Examples:
      quantkit convert flux1-dev.safetensors flux1-dev-fp8.safetensors --granularity channel
      quantkit convert ./FLUX.1-dev flux1-dev-fp8.safetensors --component transformer --format comfy
    """
    from .errors import QuantkitError
    from .quantize import convert as run
    bars = _Bars(quiet)
    try:
        options = _options(ctx, **policy)
        click.echo(f"quantkit convert: {src} -> {dst}")
        result = run(src, dst, options, overwrite=overwrite, progress=bars.progress, reports=_reports(json_path),
                     jobs=jobs, stats=stats_path, force_stats=force_stats)
    except QuantkitError as exc:
        bars.progress.close()
        _fail(exc)
    c = result.counts
    for note in result.notes:
        click.echo(f"  {note}")
    click.echo(f"  format {result.format}, recipe {result.recipe}, {result.fp8}, {result.granularity} scales")
    if result.stats is not None:
        click.echo(f"  stats {result.stats['file']}: weight ranges ({result.stats['weight_observer']}) for "
                   f"{result.stats['weight_scales']} tensors, static input scales for {result.stats['input_scales']}")
    click.echo(f"  tensors: {c['quantize']} quantized, {c['keep']} kept ({options.keep_dtype.value}), "
               f"{c['pass']} passed through")
    click.echo(f"  size: {_size(result.bytes_in)} -> {_size(result.bytes_out)} "
               f"({100 * result.bytes_out / max(result.bytes_in, 1):.0f}%)")
    click.echo(f"  time: {result.seconds:.2f} s ({result.gb_per_s:.2f} GB/s)")
    click.echo(f"  sha256 {result.output_sha256}  (manifest {result.manifest})")
    if json_path:
        _write_json(json_path, result.to_dict())


@main.command()
@click.argument("out", type=click.Path())
@click.option("--against", "against", type=click.Path(),
              help="The source checkpoint: measure every tensor against it.")
@click.option("--min-sqnr", type=DECIBELS, metavar="DB",
              help="Fail if any tensor's SQNR is below DB decibels (needs --against). Replaces the default "
                   "sanity floor: an FP8 tensor fails 3 dB under the least SQNR round-to-nearest with its own "
                   "absmax scale gives its data (about 21 dB in E4M3).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the full report as JSON to PATH.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False), metavar="DIR",
              help="Also write DIR/report.md with PNG charts (per-tensor SQNR by depth, the model's output) "
                   "and report.json (needs matplotlib).")
@click.option("--overwrite", is_flag=True, help="Replace the --json file or --report folder if it exists.")
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
@click.option("--compute-dtype", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="With --model-output: the dtype both models compute in (bf16 halves what a block holds).")
@click.option("--min-output-sqnr", type=DECIBELS, metavar="DB",
              help="With --model-output: fail if the weight-only output's SQNR (what every client computes) is "
                   "below DB decibels (implies --model-output).")
@click.option("--activations", type=click.Choice(["none", "file", "all"]), default="file", show_default=True,
              help="With --model-output: rows that simulate FP8 activation quantization on CPU (inputs of FP8 "
                   "Linears -> E4M3 and back), besides weight-only; each is one more streamed run of the quantized "
                   "model. file: W8A8 as the file implies (its static input_scales; ComfyUI's 1.0 for a comfy layer "
                   "with neither input_scale nor full_precision_matrix_mult), not run when the file implies none; "
                   "all: also W8A8 with scale 1.0 (ComfyUI without input_scale, when the file has static scales) "
                   "and W8A8 dynamic per token; none: weight-only.")
@click.option("--min-w8a8-sqnr", type=DECIBELS, metavar="DB",
              help="Fail if the output's SQNR with W8A8 as the file implies is below DB decibels (implies "
                   "--model-output and --activations file or all).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@click.option("--jobs", "-j", type=click.IntRange(min=1), metavar="N",
              help="Processes sharing the work: each file's SHA256 computed by one of them, the tensors compared "
                   "in groups; the report is the same whatever N. Default: as many as the cores and the free "
                   "memory (0.5 GB a job) allow, with 3 cores or more and files of 1 GB or more; else 1 (one "
                   "process, the SHA256s on threads beside the comparison: as fast on 2 cores, half the memory). "
                   "A larger N than the cores and the free memory allow is capped there, with a note.")
def validate(out, against, min_sqnr, json_path, report_dir, overwrite, no_hash_check, show, component, ema,
             model_output, compute_dtype, min_output_sqnr, activations, min_w8a8_sqnr, quiet, jobs):
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
    from .errors import QuantkitError
    from .validation import validate as run
    bars = _Bars(quiet)
    try:
        model_output = model_output or min_w8a8_sqnr is not None
        if (model_output or min_output_sqnr is not None) and not against:
            raise QuantkitError("--model-output compares with the source model", hint="pass --against SRC")
        if min_sqnr is not None and not against:
            raise QuantkitError("--min-sqnr measures the output against its source", hint="pass --against SRC")
        if report_dir:
            _check_report_dir(report_dir, [out, against], overwrite)
        click.echo(f"quantkit validate: {out}" + (f" against {against}" if against else ""))
        report = run(out, against, min_sqnr=min_sqnr, check_hash=not no_hash_check, component=component, ema=ema,
                     model_output=model_output, min_output_sqnr=min_output_sqnr, compute_dtype=compute_dtype,
                     activations=activations, min_w8a8_sqnr=min_w8a8_sqnr, progress=bars.progress,
                     reports=_reports(json_path), overwrite_reports=overwrite, jobs=jobs)
    except QuantkitError as exc:
        bars.progress.close()
        _fail(exc)
    _print_report(report, show)
    if json_path:
        _write_json(json_path, report.to_dict())
    if report_dir:
        _write_report("validation_report", report, report_dir)
    sys.exit(0 if report.ok else 1)


def _check_report_dir(path: str, reads: list, overwrite: bool) -> None:
    from .destinations import check_report_folder
    from .report import _pyplot
    check_report_folder(path, "--report", reads=[r for r in reads if r], overwrite=overwrite)
    _pyplot()                     # matplotlib missing: say so before the work, not after it


def _write_report(kind: str, report, path: str) -> None:
    from . import report as charts
    from .errors import QuantkitError
    try:
        files = getattr(charts, kind)(report, path)
    except QuantkitError as exc:
        _fail(exc)
    click.echo(f"  report: {path}/ ({', '.join(files)})")


def _print_rows(rows: list[dict]) -> None:
    """The model output's rows side by side: weight-only and the simulated W8A8 ones."""
    if len(rows) < 2:
        return
    click.echo(f"    {'row':<12} {'SQNR dB':>8} {'PSNR dB':>8} {'cosine':>9}  what (loaded by)")
    for r in rows:
        same = " = weight-only: the file quantizes no input" if r.get("same_as") else ""
        click.echo(f"    {r['row']:<12} {r['sqnr']:8.2f} {r['psnr']:8.2f} {r['cosine']:9.6f}  {r['what']}{same} "
                   f"({r['loaded_by']})")


def _print_report(report, show: int) -> None:
    for h in report.hashes:
        click.echo(f"  sha256 {h['role']}: {'OK' if h['ok'] else 'MISMATCH'}  {h['actual']}  {h['file']}")
    for note in report.notes:
        click.echo(f"  note: {note}")
    s = report.summary()
    if report.tensors:
        click.echo(f"  tensors compared: {s['tensors']} ({s['quantized']} FP8)")
        if s["sqnr_db"]:
            click.echo(f"  FP8 tensors: SQNR min {s['sqnr_db']['min']:.2f} dB, median {s['sqnr_db']['median']:.2f} dB;"
                       f" PSNR min {s['psnr_db']['min']:.2f} dB; cosine min {s['cosine']['min']:.6f}")
        bar = report.floor()
        if bar["rule"] == "min-sqnr":
            click.echo(f"  bar: --min-sqnr {bar['db']:g} dB for every tensor")
        elif bar["db"] is not None:
            click.echo(f"  sanity floor: {bar['what']} (lowest {bar['db']:.1f} dB)")
        worst = s["worst"][:show]
        if worst:
            click.echo("  lowest SQNR:")
            for name, v in worst:
                click.echo(f"    {v:8.2f} dB  {name}")
    m = report.model_output
    if m:
        click.echo(f"  model output ({m['architecture']}, {m['inputs']}; output loaded by {m['loaded_by']}): "
                   f"SQNR {m['sqnr']:.2f} dB, cosine {m['cosine']:.6f}, relative L2 error {m['rel_l2']:.4f}")
        _print_rows(m.get("rows") or [])
    jobs = f", {report.jobs} processes, peak RSS {report.workers_peak_rss_bytes / 1e9:.2f} GB together" \
        if report.jobs > 1 else ""
    if report.ok:
        click.echo(f"  PASS ({report.seconds:.2f} s{jobs})")
    else:
        click.echo(f"  FAIL: {len(report.failures)} problem(s)")
        for f in report.failures[:20]:
            click.echo(f"    {f}")
        if len(report.failures) > 20:
            click.echo(f"    ... and {len(report.failures) - 20} more (see --json)")


@main.command(cls=_RuleOrderCommand, epilog=PATTERN_HELP)
@click.argument("src", type=click.Path())
@_policy_options
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the plan as JSON to PATH.")
@click.option("--overwrite", is_flag=True, help="Replace the --json file if it exists.")
@click.option("--only", type=click.Choice(["quantize", "keep", "pass"]), help="List only tensors with this action.")
@_stats_options
@click.pass_context
def plan(ctx, src, json_path, overwrite, only, stats_path, force_stats, **policy):
    """Show what 'convert' would do to every tensor of SRC, without writing anything.

    Same options as 'convert'. Reads only the header: instant even for a 24 GB checkpoint.

    \b
    Example:
      quantkit plan model.safetensors --keep '*.attn.*' --only quantize
    """
    from .comfy_names import joined as joined_parts
    from .destinations import check_report_path, source_reads
    from .errors import QuantkitError
    from .formats import get_format
    from .plan import check_stats, load_stats, make_plan, options_with_stats, recipe_sizes
    from .sources import open_source
    warnings = []
    try:
        options = _options(ctx, **policy)
        stats = load_stats(stats_path) if stats_path else None
        with open_source(src, component=options.component, ema=options.ema,
                         names=get_format(options.format).source_names) as f:
            for option, path in _reports(json_path).items():
                check_report_path(path, option, reads=source_reads(f), overwrite=overwrite)
            if stats is not None:
                check_stats(f, stats, force=force_stats, warn=warnings.append)
                options = options_with_stats(options, stats)
            p = make_plan(f, options, stats)
            sizes = recipe_sizes(f, options)
            joined = joined_parts(f)
    except QuantkitError as exc:
        _fail(exc)
    for note in p.notes:
        click.echo(note)
    # The name column fits the names (in terminal cells: wide characters take two), up to a cap
    # past which a longer name only pushes its own line: names are never cut, so they can be pasted.
    width = min(max((_cells(_printable(t.name)) for t in p.tensors), default=10), NAME_COLUMN_MAX)
    click.echo(f"{_pad('tensor', width)}  {'shape':<16} {'dtype':<5} -> {'action':<8} {'out':<8} reason")
    for t in p.tensors:
        if only and t.action.value != only:
            continue
        shape = "x".join(map(str, t.info.shape)) or "scalar"
        origin = f" [= {' + '.join(joined[t.name])}]" if t.name in joined else ""
        calibrated = f" (stats: input range {t.input_range:.4g})" if t.input_range is not None else ""
        click.echo(f"{_pad(t.name, width)}  {shape:<16} {t.info.dtype.code:<5} -> {t.action.value:<8} "
                   f"{t.out_dtype.code:<8} {t.decision.reason}{calibrated}{origin}")
    click.echo(f"\n{p.count(_action('quantize'))} quantized, {p.count(_action('keep'))} kept, "
               f"{p.count(_action('pass'))} passed through; size {_size(p.bytes_in)} -> {_size(p.bytes_out)}"
               f" ({100 * p.bytes_out / max(p.bytes_in, 1):.0f}%), recipe {options.recipe.value}")
    click.echo("by recipe: " + ", ".join(f"{name} {_size(n)} ({100 * n / max(p.bytes_in, 1):.0f}%)"
                                         if n is not None else f"{name} not possible" for name, n in sizes.items()))
    if p.stats is not None:
        click.echo(f"stats {p.stats['file']}: weight ranges for {p.stats['weight_scales']} of {len(p.quantized())} "
                   f"quantized tensors, input ranges for {p.stats['input_scales']}")
    for w in [*warnings, *p.warnings]:
        click.echo(f"warning: {w}", err=True)
    if json_path:
        _write_json(json_path, {**p.to_dict(), "bytes_out_by_recipe": sizes, **({"joined": joined} if joined else {})})


NAME_COLUMN_MAX = 72


def _cells(text: str) -> int:
    """Terminal cells ``text`` takes: East Asian wide and full-width characters take two,
    combining marks none."""
    import unicodedata
    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1
               for c in text)


def _pad(text: str, width: int) -> str:
    text = _printable(text)
    return text + " " * max(width - _cells(text), 0)


def _printable(text: str) -> str:
    """A name from a file, safe for a terminal: control characters (newlines, escape sequences)
    shown as escapes."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _action(name):
    from .policy import Action
    return Action(name)


@main.command()
@click.option("--show", "show", metavar="NAME", help="Explain one preset: what it keeps in high precision and why.")
def presets(show):
    """List the architecture presets (--preset NAME), or explain one.

    \b
    Example:
      quantkit presets --show flux
    """
    from .errors import QuantkitError
    from .presets import REGISTRY
    if show is None:
        click.echo(f"{'auto':<22} detect the architecture from the checkpoint's keys (default)")
        for name, p in REGISTRY.items():
            click.echo(f"{name:<22} {p.summary}")
        click.echo("\nThe summaries say what --recipe compact quantizes; --recipe mixed (the default) keeps the "
                   "attention projections in BF16 (docs/presets.md).")
        return
    if show not in REGISTRY:
        _fail(QuantkitError(f"unknown preset {show!r}", hint=f"known presets: {', '.join(REGISTRY)}"))
    p = REGISTRY[show]
    click.echo(f"{p.name}: {p.summary}")
    if p.detection:
        click.echo(f"\nRecognised by --preset auto: {p.detection}")
    if p.quantizes:
        click.echo("\nQuantized to FP8 beyond the default policy's linear layers:")
        for what, why in p.quantizes:
            click.echo(f"  - {what}: {why}")
    click.echo("\nKept in high precision:")
    for what, why in p.keeps:
        click.echo(f"  - {what}: {why}")
    if p.attention:
        click.echo("\nAttention projections it recognises (kept in BF16 by --recipe mixed, the default; FP8 with "
                   f"--recipe compact):\n  {p.attention}")
    if p.reference:
        click.echo(f"\nCompared with published FP8 files: {p.reference}")


@main.command()
def formats():
    """List the output formats (--format NAME)."""
    from .formats import REGISTRY
    for name, cls in sorted(REGISTRY.items()):
        click.echo(f"{name:<20} {cls.summary}")


@main.command(cls=_RuleOrderCommand, epilog=PATTERN_HELP)
@click.argument("src", type=click.Path())
@_policy_options
@click.option("--target-sqnr", type=DECIBELS, metavar="DB",
              help="Propose the layers to keep so that the model's output reaches DB decibels.")
@click.option("--show", type=click.IntRange(min=0), default=10, show_default=True, help="How many layers to list.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the ranking as JSON to PATH.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False), metavar="DIR",
              help="Also write DIR/report.md with a PNG chart of the ranking and report.json (needs matplotlib).")
@click.option("--overwrite", is_flag=True, help="Replace the --json file or --report folder if it exists.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@click.pass_context
def sensitivity(ctx, src, target_sqnr, show, json_path, report_dir, overwrite, quiet, **policy):
    """Rank the layers of SRC by how much quantizing each alone costs the model's output.

    Same options as 'convert' (the layers ranked are those it would quantize: pass --recipe compact
    to rank the attention projections too). Each layer is quantized alone as convert writes it, the
    model (built from the config.json beside SRC) runs on the seeded inputs of 'validate
    --model-output', and its output is compared with the original's. --target-sqnr proposes the
    layers to keep (worst first, re-measured each time) for the whole plan to reach DB. The model
    is held in float32: for models that fit in memory.

    \b
    Example:
      quantkit sensitivity ./all-MiniLM-L6-v2 --recipe compact --target-sqnr 25
    """
    from .errors import QuantkitError
    from .sensitivity import sensitivity as rank
    bars = _Bars(quiet)
    try:
        options = _options(ctx, **policy)
        if json_path:
            from .destinations import check_report_path
            check_report_path(json_path, "--json", reads=[src], overwrite=overwrite)
        if report_dir:
            _check_report_dir(report_dir, [src], overwrite)
        click.echo(f"quantkit sensitivity: {src}")
        report = rank(src, options, target_sqnr=target_sqnr, progress=bars.progress)
    except QuantkitError as exc:
        bars.progress.close()
        _fail(exc)
    click.echo(f"  {report.architecture}, {report.inputs}; recipe {report.recipe}, {len(report.layers)} layers ranked")
    click.echo("  output SQNR with each layer alone in FP8, worst first:")
    for cost in report.layers[:show]:
        click.echo(f"    {cost.sqnr:8.2f} dB  {_printable(cost.name)}  ({cost.kind})")
    click.echo(f"  all {len(report.layers)} in FP8: output SQNR {report.all_sqnr:.2f} dB")
    if report.keep is not None:
        rules = " ".join(f"--keep {_shell(name)}" for name in report.keep) or "(none)"
        verdict = "meets" if report.target_met else "does NOT meet"
        click.echo(f"  keep {len(report.keep)} layer(s) for {report.target_sqnr:g} dB: {rules}")
        click.echo(f"  with them kept: output SQNR {report.keep_sqnr:.2f} dB ({verdict} the target)")
    if json_path:
        _write_json(json_path, report.to_dict())
    if report_dir:
        _write_report("sensitivity_report", report, report_dir)


def _shell(text: str) -> str:
    import shlex
    return shlex.quote(text)


def _terminate(signum, frame):
    raise Terminated()


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
    import os
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())   # as `python -m` does: modules in the current folder are found
    from .testing import QuantizerCheckFailed, QuantizerSpecError, check_quantizer, load_quantizer
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


# ----------------------------------------------------------------------------- publish, verify

@main.command()
@click.argument("out", type=click.Path())
@click.argument("dst", type=click.Path())
@click.option("--against", type=click.Path(),
              help="The source checkpoint: re-check its SHA256, carry its license file and model card's license, "
                   "and validate OUT against it now (unless --report).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False),
              help="A 'quantkit validate OUT --json' report whose figures the card shows (instead of validating now).")
@click.option("--model-output", is_flag=True, help="With --against: also compare the model's outputs (loads it).")
@click.option("--base-model", "base_model", multiple=True, metavar="ORG/NAME",
              help="The original model's hub id (repeatable); found by itself when the source is in a Hugging Face "
                   "cache.")
@click.option("--license", "license_id", metavar="ID",
              help="License id when the source's is not found, e.g. apache-2.0.")
@click.option("--name", metavar="TITLE", help="The model card's title (default: DST's name).")
@click.option("--link", is_flag=True, help="Hard-link the weight files instead of copying them (same file system).")
@click.option("--overwrite", is_flag=True, help="Replace DST if it is a release folder.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the summary as JSON to PATH.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def publish(out, dst, against, report_path, model_output, base_model, license_id, name, link, overwrite, json_path,
            quiet):
    """Write the release folder DST for the quantkit output OUT.

    DST gets the weights (and config files of a folder format), README.md (a model card: hub
    front matter with base_model and base_model_relation: quantized, what was quantized and kept
    and why, the recipe, the validation figures, how to load it, the command that reproduces it),
    provenance.json (source files and hashes, options, versions, validation) and SHA256SUMS
    ('sha256sum -c SHA256SUMS' checks a download; 'quantkit verify DST' checks more).

    OUT's files must still have the SHA256 of its manifest; OUT is only read. DST appears when
    complete and verified. Exit 1 when the validation fails, 2 for unusable arguments.

    \b
    Example:
      quantkit publish minilm-fp8 release --against all-MiniLM-L6-v2 --base-model sentence-transformers/all-MiniLM-L6-v2
    """
    import shlex

    from .errors import QuantkitError
    from .publish import PublishOptions
    from .publish import publish as run
    bars = _Bars(quiet)
    try:
        options = PublishOptions(against=against, report=report_path, model_output=model_output,
                                 base_model=tuple(base_model), license=license_id, name=name, link=link,
                                 overwrite=overwrite, command=shlex.join(["quantkit", *sys.argv[1:]]))
        result = run(out, dst, options, progress=bars.progress, reports=_reports(json_path))
    except QuantkitError as exc:
        bars.progress.close()
        _fail(exc)
    click.echo(f"quantkit publish: {out} -> {dst}")
    for note in result.notes:
        click.echo(f"  note: {note}")
    weights = [f for f in result.files if f["name"].endswith(".safetensors")]
    click.echo(f"  {len(result.files)} files, weights {_size(sum(f['bytes'] for f in weights))} "
               f"in {len(weights)} file(s)")
    v = result.validation
    if v and v["summary"].get("sqnr_db"):
        click.echo(f"  validation: {v['summary']['quantized']} FP8 tensors, SQNR min "
                   f"{v['summary']['sqnr_db']['min']:.2f} dB")
    click.echo(f"  SHA256SUMS sha256 {result.sums_sha256}  (publish it beside the link: it pins every file)")
    if json_path:
        _write_json(json_path, result.to_dict())


@main.command()
@click.argument("folder", type=click.Path())
@click.option("--against", type=click.Path(), help="The source checkpoint: check its SHA256 against the provenance.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the report as JSON to PATH.")
@click.option("--overwrite", is_flag=True, help="Replace the --json report if it exists.")
def verify(folder, against, json_path, overwrite):
    """Check a release folder written by 'quantkit publish'.

    Every file SHA256SUMS lists has its hash, no other file is there (hosting metadata such as
    .git/ and .gitattributes aside), provenance.json and the model card agree with SHA256SUMS,
    and every weight file parses, declares the recorded format and source and holds the recorded
    tensors. With --against, the source's hashes too.

    Exit 0 when everything checks out, 1 with every problem listed by file, 2 when the arguments
    are unusable.
    """
    from .errors import QuantkitError
    from .verify import verify as run
    try:
        report = run(folder, against, reports=_reports(json_path), overwrite_reports=overwrite)
    except QuantkitError as exc:
        _fail(exc)
    click.echo(f"quantkit verify: {folder}" + (f" against {against}" if against else ""))
    click.echo(f"  sha256: {sum(c['ok'] for c in report.checked)} of {len(report.checked)} files match")
    if report.ok:
        click.echo(f"  PASS ({report.seconds:.2f} s)")
    else:
        click.echo(f"  FAIL: {len(report.problems)} problem(s)")
        for p in report.problems:
            click.echo(f"    {p}")
    if json_path:
        _write_json(json_path, report.to_dict())
    sys.exit(0 if report.ok else 1)


@main.command(cls=_RuleOrderCommand, epilog=PATTERN_HELP)
@click.argument("src", type=click.Path())
@_policy_options
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
@click.option("--compute-dtype", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="The dtype the model computes in while its inputs are observed.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the summary as JSON to PATH.")
@click.option("--overwrite", is_flag=True, help="Replace STATS (and the --json file) if they exist.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@click.pass_context
def calibrate(ctx, src, out, weight_observer, activation_observer, inputs, text_encoders, steps, seeds, samples,
              weights_only, compute_dtype, json_path, overwrite, quiet, **policy):
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
    from .calibration.collect import CalibrationSettings
    from .calibration.collect import calibrate as measure
    from .errors import QuantkitError
    bars = _Bars(quiet)
    try:
        options = _options(ctx, **policy)
        settings = CalibrationSettings(weight_observer, activation_observer, inputs, tuple(text_encoders), steps,
                                       seeds, samples, weights_only, compute_dtype)
        click.echo(f"quantkit calibrate: {src} -> {out}")
        result = measure(src, out, options, settings, overwrite=overwrite, progress=bars.progress,
                         reports=_reports(json_path))
    except QuantkitError as exc:
        bars.progress.close()
        _fail(exc)
    for note in result.notes:
        click.echo(f"  note: {note}")
    click.echo(f"  weights: {result.layers} observed ({result.weight_observer}, {result.granularity} scales)")
    if result.activation_observer:
        click.echo(f"  inputs: {result.inputs_observed} layers observed ({result.activation_observer}) over "
                   f"{result.samples} samples: {result.inputs}")
        click.echo(f"  weights held at most: {_size(result.peak_bytes)} of {_size(result.model_bytes)} (streamed)")
        for name, rng in result.largest_inputs(5):
            click.echo(f"    input range {rng:10.4g}  {_printable(name)}")
    rss = _peak_rss()
    click.echo(f"  time: {result.seconds:.2f} s" + (f", process peak RSS {_size(rss)}" if rss else ""))
    click.echo(f"  source sha256 {result.source_sha256}")
    click.echo(f"  wrote {out} (sha256 {result.stats_sha256})")
    if json_path:
        _write_json(json_path, result.to_dict())


@main.group()
def stats():
    """Read stats files written by 'quantkit calibrate'."""


@stats.command("show")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--top", type=click.IntRange(min=0), default=20, show_default=True, help="How many layers to list.")
@click.option("--sort", type=click.Choice(["range", "outlier"]), default="range", show_default=True,
              help="List the largest input ranges first, or the largest outlier ratios (absmax / RMS).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write every layer as JSON to PATH.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False), metavar="DIR",
              help="Also write DIR/report.md with a PNG chart of every layer's weight and input range, and "
                   "report.json (needs matplotlib).")
@click.option("--overwrite", is_flag=True, help="Replace the --json file or --report folder if it exists.")
def stats_show(path, top, sort, json_path, report_dir, overwrite):
    """Show what the stats file PATH holds: its source, observers, and each layer's ranges.

    An outlier ratio (absmax / RMS) says how far a layer's largest value sits above its typical
    one: large ratios are what a per-tensor FP8 scale represents worst.
    """
    from .calibration.collect import layer_table
    from .calibration.stats import load
    from .destinations import check_report_path
    from .errors import QuantkitError
    try:
        if json_path:
            check_report_path(json_path, "--json", reads=[path], overwrite=overwrite)
        if report_dir:
            _check_report_dir(report_dir, [path], overwrite)
        s = load(path)
        rows = layer_table(s, sort)
    except QuantkitError as exc:
        _fail(exc)
    src = s.source
    click.echo(f"stats {path}")
    click.echo(f"  source: {src.get('name', '?')}  sha256 {s.source_sha256}")
    click.echo(f"  weights: {len(s.weights)} ({s.weight_observer}, {s.granularity.value} scales, {s.fp8.name})")
    if s.activation_observer:
        click.echo(f"  inputs: {len(s.activations)} layers ({s.activation_observer}, static per tensor) over "
                   f"{s.samples} samples: {s.inputs}")
    else:
        click.echo("  inputs: none (weights only)")
    shown = rows[:top]
    if shown:
        click.echo(f"  {'input range':>12} {'outlier':>8} {'weight range':>12} {'outlier':>8}  layer "
                   f"(by {'range' if sort == 'range' else 'outlier ratio, inputs'}; {len(shown)} of {len(rows)})")
        for r in shown:
            click.echo(f"  {_num(r['input_range']):>12} {_num(r['input_outlier'], 1):>8} "
                       f"{_num(r['weight_range']):>12} {_num(r['weight_outlier'], 1):>8}  {_printable(r['tensor'])}"
                       f"{'  (per sample: weight-only)' if r['input_per_sample'] else ''}")
    if json_path:
        _write_json(json_path, {"path": path, **s.describe(), "source": src, "options": s.options, "layers": rows})
    if report_dir:
        from .report import stats_report
        try:
            files = stats_report(s, rows, report_dir)
        except QuantkitError as exc:
            _fail(exc)
        click.echo(f"  report: {report_dir}/ ({', '.join(files)})")


def _peak_rss() -> int | None:
    """This process's peak resident memory in bytes (Linux / macOS), or None where it cannot be told."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024        # macOS: bytes; Linux: KiB


def _num(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}g}" if digits > 1 else f"{v:.1f}"


def run() -> None:
    """Console entry point: SIGTERM unwinds like Ctrl-C (see _Group); lines reach a pipe as they
    are printed (the header before the work, not at the end); a reader that goes away (``| head``)
    silences the rest of the output without changing the exit status.

    The command's work is done (files written, fsynced and renamed, reports flushed) when ``main``
    returns, so the process ends at once with its status, without the interpreter's teardown:
    that tears torch's operator libraries down one by one, ~0.5 s of every command that imported
    torch (``python -c "import quantkit.quantize, quantkit.validate"``: 1.68-1.88 s, 1.15-1.30 s
    ending with ``os._exit``)."""
    import signal
    signal.signal(signal.SIGTERM, _terminate)
    sys.meta_path.insert(0, _NumpyBeforeTorch())
    sys.stdout = _PipeSafe(sys.stdout)
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    if code is None:
        code = 0
    elif not isinstance(code, int):           # sys.exit("message"): what the interpreter would do
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


class _NumpyBeforeTorch:
    """Imports numpy (from Python) right before torch is first imported. torch's C start-up imports
    numpy itself and clears whatever error that import raised: a Ctrl-C or SIGTERM landing then
    (the ``Terminated`` of ``_terminate``) was lost, and the command ran to its end (measured: 3
    SIGTERMs of 25 sent during calibrate's start-up, exit 0 seconds later). Imported first, numpy's
    import lets the exception through, and torch finds it loaded."""

    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            import numpy  # noqa: F401
        return None


class _PipeSafe:
    """stdout, line-buffered, that turns into /dev/null when its reader closes the pipe."""

    def __init__(self, stream):
        self._stream = stream
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)

    def write(self, text):
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._silence()
            return len(text)

    def flush(self):
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._silence()

    def _silence(self):
        import os
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())     # the interpreter's last flush at exit goes nowhere too
        os.close(devnull)

    def __getattr__(self, name):
        return getattr(self._stream, name)


if __name__ == "__main__":
    run()
