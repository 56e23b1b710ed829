"""The options the commands share, each declared once (as pip's ``cmdoptions``): a factory per
option, called with the command's own help text where it differs; choices built from the
library's enums."""
from __future__ import annotations

import sys

import click

from ..dtypes import FP8_FORMATS, Granularity
from ..options import ActivationRows, ComputeDtype, KeepDtype, Recipe

GRANULARITIES = tuple(g.value for g in Granularity)
KEEP_DTYPES = tuple(k.value for k in KeepDtype)
FP8_DTYPES = tuple(FP8_FORMATS)
RECIPES = tuple(r.value for r in Recipe)
COMPUTE_DTYPES = tuple(d.value for d in ComputeDtype)
ACTIVATION_ROWS = tuple(a.value for a in ActivationRows)

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


JSON = "--json"       # the option that writes a command's result as JSON, also named in refusals of its path


STDOUT = "-"              # --json -: the JSON alone on standard output
JSON_STREAM = "quantkit.json_stream"


def json_option(help: str):
    return click.option(JSON, "json_path", type=click.Path(dir_okay=False, allow_dash=True), callback=_json_to_stdout,
                        help=help + " '-' writes it to standard output (what the command prints for people then "
                                    "goes to standard error).")


def _json_to_stdout(ctx, param, value):
    """With ``--json -`` the command's own lines go to standard error, so a pipe
    (``quantkit plan SRC --json - | jq``) reads the JSON document and nothing else."""
    if value == "":
        raise click.BadParameter("an empty path: give a file name, or '-' for standard output", ctx, param)
    if value == STDOUT and JSON_STREAM not in ctx.meta:
        ctx.meta[JSON_STREAM] = real = sys.stdout
        sys.stdout = sys.stderr
        ctx.call_on_close(lambda: setattr(sys, "stdout", real))
    return value


def overwrite_option(help: str):
    return click.option("--overwrite", is_flag=True, help=help)


def quiet_option():
    return click.option("-q", "--quiet", is_flag=True, help="No progress bars.")


def report_option(help: str, *, folder: bool = True):
    """--report: the folder a command writes its charts to, or (``folder`` False) a report file it reads."""
    if folder:
        return click.option("--report", "report_dir", type=click.Path(file_okay=False), metavar="DIR", help=help,
                            callback=_a_folder_name)
    return click.option("--report", "report_path", type=click.Path(dir_okay=False), help=help)


def _a_folder_name(ctx, param, value):
    # '-' is standard output for --json; a folder of that name would only surprise
    if value is not None and value.strip() in ("", STDOUT):
        raise click.BadParameter(f"{value!r} is no folder name (charts are files: give a folder)", ctx, param)
    return value


def jobs_option(help: str):
    return click.option("--jobs", "-j", type=click.IntRange(min=1), metavar="N", help=help)


def compute_dtype_option(help: str):
    return click.option("--compute-dtype", type=click.Choice(COMPUTE_DTYPES), default=ComputeDtype.FP32.value,
                        show_default=True, help=help)


class _Size(click.ParamType):
    """A size in bytes: 8GB, 500MB, 2GiB (decimal units as Hugging Face uses them)."""

    name = "size"

    def convert(self, value, param, ctx):
        from ..errors import OptionsError
        from ..options import parse_size
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except OptionsError:
            self.fail(f"{value!r} is not a size (e.g. 8GB, 500MB, 2GiB)", param, ctx)


def max_memory_option(help: str):
    return click.option("--max-memory", type=_Size(), metavar="SIZE", help=help)


def activations_option(help: str):
    return click.option("--activations", type=click.Choice(ACTIVATION_ROWS), default=ActivationRows.FILE.value,
                        show_default=True, help=help)


def policy_options(f):
    """convert, plan, sensitivity, calibrate: what becomes of each tensor (``convert_options`` reads them)."""
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


def convert_options(ctx, *, granularity, fmt, fp8_dtype, preset, recipe, keep_dtype, quantize_conv, allow_nonfinite,
                    comfy_header_metadata, component, ema, max_shard_size, quantize_rules=(), keep_rules=()):
    """ConvertOptions from the policy options (--quantize/--keep come in command-line order from ctx)."""
    from ..options import ConvertOptions
    return ConvertOptions.from_strings(granularity=granularity, fp8=fp8_dtype, format=fmt, keep_dtype=keep_dtype,
                                       rules=ctx.meta.get("quantkit.rules", []), quantize_conv=quantize_conv,
                                       allow_nonfinite=allow_nonfinite, preset=preset,
                                       comfy_header_metadata=comfy_header_metadata, component=component, ema=ema,
                                       max_shard_size=max_shard_size, recipe=recipe)


def stats_options(f):
    """convert / plan: --stats and --force-stats."""
    f = click.option("--force-stats", is_flag=True,
                     help="Use --stats calibrated on another checkpoint (a warning instead of a refusal).")(f)
    return click.option("--stats", "stats_path", type=click.Path(dir_okay=False), metavar="STATS",
                        help="A stats file from 'quantkit calibrate' of this checkpoint: weight scales from its "
                             "ranges, and static activation scales (input_scale) where the format has a place "
                             "for them. Granularity and FP8 dtype default to the stats'.")(f)


def reports(json_path: str | None) -> dict[str, str]:
    """The report files a command writes at its end, by option (checked before any work)."""
    return {JSON: json_path} if json_path and json_path != STDOUT else {}


def check_report_dir(path: str, reads: list, overwrite: bool) -> None:
    """--report DIR, checked before any work: a folder the command may write, and matplotlib there."""
    from ..destinations import check_report_folder
    from ..report import _pyplot
    check_report_folder(path, "--report", reads=[r for r in reads if r], overwrite=overwrite)
    _pyplot()                     # matplotlib missing: say so before the work, not after it
