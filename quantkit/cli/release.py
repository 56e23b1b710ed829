"""Commands of the release stage: publish, verify."""
from __future__ import annotations

import sys

import click

from . import render
from .group import main, progress_bars
from .options import json_option, overwrite_option, quiet_option, report_option, reports


# ----------------------------------------------------------------------------- publish, verify

@main.command()
@click.argument("out", type=click.Path())
@click.argument("dst", type=click.Path())
@click.option("--against", type=click.Path(),
              help="The source checkpoint: re-check its SHA256, carry its license file and model card's license, "
                   "and validate OUT against it now (unless --report).")
@report_option("A 'quantkit validate OUT --json' report whose figures the card shows (instead of validating now).",
               folder=False)
@click.option("--model-output", is_flag=True, help="With --against: also compare the model's outputs (loads it).")
@click.option("--base-model", "base_model", multiple=True, metavar="ORG/NAME",
              help="The original model's hub id (repeatable); found by itself when the source is in a Hugging Face "
                   "cache.")
@click.option("--license", "license_id", metavar="ID",
              help="License id when the source's is not found, e.g. apache-2.0.")
@click.option("--name", metavar="TITLE", help="The model card's title (default: DST's name).")
@click.option("--link", is_flag=True, help="Hard-link the weight files instead of copying them (same file system).")
@overwrite_option("Replace DST if it is a release folder.")
@json_option("Also write the summary as JSON to PATH.")
@quiet_option()
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

    from ..publish import PublishOptions
    from ..publish import publish as run
    progress = progress_bars(quiet)
    options = PublishOptions(against=against, report=report_path, model_output=model_output,
                             base_model=tuple(base_model), license=license_id, name=name, link=link,
                             overwrite=overwrite, command=shlex.join(["quantkit", *sys.argv[1:]]))
    result = run(out, dst, options, progress=progress, reports=reports(json_path))
    render.publication(result, out, dst)
    if json_path:
        render.write_json(json_path, result.to_dict())


@main.command()
@click.argument("folder", type=click.Path())
@click.option("--against", type=click.Path(), help="The source checkpoint: check its SHA256 against the provenance.")
@json_option("Write the report as JSON to PATH.")
@overwrite_option("Replace the --json report if it exists.")
def verify(folder, against, json_path, overwrite):
    """Check a release folder written by 'quantkit publish'.

    Every file SHA256SUMS lists has its hash, no other file is there (hosting metadata such as
    .git/ and .gitattributes aside), provenance.json and the model card agree with SHA256SUMS,
    and every weight file parses, declares the recorded format and source and holds the recorded
    tensors. With --against, the source's hashes too.

    Exit 0 when everything checks out, 1 with every problem listed by file, 2 when the arguments
    are unusable.
    """
    from ..publish import verify as run
    report = run(folder, against, reports=reports(json_path), overwrite_reports=overwrite)
    render.verification(report, folder, against)
    if json_path:
        render.write_json(json_path, report.to_dict())
    sys.exit(0 if report.ok else 1)
