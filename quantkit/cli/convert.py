"""Commands of the convert stage: convert, plan, presets, formats."""
from __future__ import annotations

import dataclasses

import click

from . import render
from .group import main, progress_bars
from .options import (DECIBELS, PATTERN_HELP, _RuleOrderCommand, convert_options, jobs_option, json_option,
                      overwrite_option, policy_options, quiet_option, reports, stats_options)


def target_options(f):
    """convert / plan: --target-sqnr and --keep-most-sensitive (``sensitivity.choose_keep``)."""
    f = click.option("--keep-most-sensitive", "most_sensitive", type=click.IntRange(min=0), metavar="N",
                     help="Rank the layers as 'quantkit sensitivity' does and keep the N most sensitive in high "
                          "precision (needs the model's config.json beside the weights).")(f)
    return click.option("--target-sqnr", type=DECIBELS, metavar="DB",
                        help="Rank the layers as 'quantkit sensitivity' does and keep the fewest most sensitive ones "
                             "for the output of the file written to reach DB decibels of SQNR on the seeded inputs "
                             "of 'validate --model-output' (needs the model's config.json beside the weights; "
                             "a target out of reach is refused with the best figure).")(f)


def _keep_for_target(src, options, target_sqnr, most_sensitive, stats_path, progress, dst=None, overwrite=False):
    """The options with the layers a target keeps, and the record of why (None, None: no target);
    ``dst`` (convert's) is checked before the ranking's work."""
    if target_sqnr is None and most_sensitive is None:
        return options, None
    from ..errors import QuantkitError
    from ..sensitivity import choose_keep
    if stats_path:
        raise QuantkitError("--target-sqnr / --keep-most-sensitive rank the layers with absmax scales",
                            hint="leave --stats out, or keep layers by hand with --keep")
    if dst is not None:
        from ..destinations import check_destination
        from ..formats import get_format
        check_destination(src, dst, overwrite, get_format(options.format).folder or options.max_shard_bytes is not None)
    choice = choose_keep(src, options, target_sqnr=target_sqnr, most_sensitive=most_sensitive, progress=progress)
    click.echo(f"keep: {choice.reason}, measured on {choice.inputs}")
    for k in choice.kept:
        click.echo(f"  #{k.rank} {render.printable(k.name)}: alone in FP8 {k.alone_sqnr:.2f} dB; "
                   f"keeping it {k.gain:+.2f} dB -> {k.sqnr:.2f} dB")
    return choice.options, choice.to_dict()


@main.command(cls=_RuleOrderCommand, epilog=PATTERN_HELP)
@click.argument("src", type=click.Path())
@click.argument("dst", type=click.Path())
@policy_options
@overwrite_option("Replace DST if it exists.")
@json_option("Also write the summary as JSON to PATH.")
@quiet_option()
@jobs_option("Processes converting the shards of a sharded output (--max-shard-size) side by side, "
             "each streaming; the output is the same whatever N. Default: as many as the cores and "
             "the free memory (0.5 GB a job) allow; 1 with 2 cores or fewer (one process keeps two busy). "
             "A larger N is capped there (and at the pieces of work), with a note.")
@stats_options
@target_options
@click.option("--rounding", type=click.Choice(["nearest", "gptq"]), default="nearest", show_default=True,
              help="How weights become FP8 codes: each to its nearest, or GPTQ (each column's rounding error "
                   "moved onto the columns not yet rounded, by the layer's input Hessian; the same scales and "
                   "codes any client loads). gptq needs --stats from 'quantkit calibrate --rounding gptq'.")
@click.pass_context
def convert(ctx, src, dst, overwrite, json_path, quiet, jobs, stats_path, force_stats, target_sqnr, most_sensitive,
            rounding, **policy):
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
    --target-sqnr DB keeps the fewest most sensitive layers (ranked as 'quantkit sensitivity'
    ranks them) for the written file's output to reach DB; the manifest records them and why.

    \b
    Examples:
      quantkit convert flux1-dev.safetensors flux1-dev-fp8.safetensors --granularity channel
      quantkit convert ./FLUX.1-dev flux1-dev-fp8.safetensors --component transformer --format comfy
      quantkit convert ./all-MiniLM-L6-v2 minilm-fp8.safetensors --target-sqnr 30
    """
    from ..options import Rounding
    from ..quantize import convert as run
    progress = progress_bars(quiet)
    options = dataclasses.replace(convert_options(ctx, **policy), rounding=Rounding(rounding))
    click.echo(f"quantkit convert: {src} -> {dst}")
    options, keep_choice = _keep_for_target(src, options, target_sqnr, most_sensitive, stats_path, progress, dst,
                                            overwrite)
    result = run(src, dst, options, overwrite=overwrite, progress=progress, reports=reports(json_path),
                 jobs=jobs, stats=stats_path, force_stats=force_stats, keep_choice=keep_choice)
    render.conversion(result, options.keep_dtype.value)
    if json_path:
        render.write_json(json_path, result.to_dict())


@main.command(cls=_RuleOrderCommand, epilog=PATTERN_HELP)
@click.argument("src", type=click.Path())
@policy_options
@json_option("Write the plan as JSON to PATH.")
@overwrite_option("Replace the --json file if it exists.")
@click.option("--only", type=click.Choice(["quantize", "keep", "pass"]), help="List only tensors with this action.")
@stats_options
@target_options
@click.pass_context
def plan(ctx, src, json_path, overwrite, only, stats_path, force_stats, target_sqnr, most_sensitive, **policy):
    """Show what 'convert' would do to every tensor of SRC, without writing anything.

    Same options as 'convert'. Reads only the header: instant even for a 24 GB checkpoint
    (with --target-sqnr or --keep-most-sensitive, the model is ranked first, as convert ranks it).

    \b
    Example:
      quantkit plan model.safetensors --keep '*.attn.*' --only quantize
    """
    from ..plan import plan_source
    options, keep_choice = _keep_for_target(src, convert_options(ctx, **policy), target_sqnr, most_sensitive,
                                            stats_path, progress_bars(True))
    planned = plan_source(src, options, stats=stats_path, force_stats=force_stats, reports=reports(json_path),
                          overwrite=overwrite, keep_choice=keep_choice)
    render.source_plan(planned, only)
    if json_path:
        render.write_json(json_path, planned.to_dict())


@main.command()
@click.option("--show", "show", metavar="NAME", help="Explain one preset: what it keeps in high precision and why.")
def presets(show):
    """List the architecture presets (--preset NAME), or explain one.

    \b
    Example:
      quantkit presets --show flux
    """
    from ..errors import QuantkitError
    from ..presets import REGISTRY
    if show is None:
        render.preset_list(REGISTRY)
    elif show not in REGISTRY:
        raise QuantkitError(f"unknown preset {show!r}", hint=f"known presets: {', '.join(REGISTRY)}")
    else:
        render.preset(REGISTRY[show])


@main.command()
def formats():
    """List the output formats (--format NAME)."""
    from ..formats import REGISTRY
    render.format_list(REGISTRY)
