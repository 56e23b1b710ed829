"""The CLI as a thin package, validation's options as data, plan's work as one library call.

The command's behaviour is pinned by the CLI tests (test_cli_minilm, test_user_edges, ...); these
tests pin the shape: one place maps a library error to its exit code, each shared option is
declared once, choices come from the library's enums, and the library does what plan shows.
"""
import json
import os
import re
import sys
import types

import click
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import quantkit
from quantkit.cli import main
from quantkit.options import ActivationRows, ComputeDtype, ConvertOptions, ValidateOptions

CLI = os.path.join(os.path.dirname(quantkit.__file__), "cli")


def _sources() -> dict[str, str]:
    return {f: open(os.path.join(CLI, f), encoding="utf-8").read() for f in sorted(os.listdir(CLI))
            if f.endswith(".py")}


def test_every_file_of_the_cli_package_is_short():
    lengths = {f: s.count("\n") for f, s in _sources().items()}
    assert all(n < 300 for n in lengths.values()), lengths


def test_one_place_maps_a_library_error_to_its_exit_code():
    found = sum(len(re.findall(r"except\s+\(?QuantkitError\b", s)) for s in _sources().values())
    assert found == 1


@pytest.mark.parametrize("flag", ["--json", "--overwrite", "--quiet", "--jobs", "--compute-dtype", "--activations"])
def test_a_shared_option_is_declared_once(flag):
    declared = sum(s.count(f'"{flag}"') for s in _sources().values())
    assert declared == 1, flag


def test_commands_share_the_declared_options():
    """Every command that writes JSON or replaces files got them from the one factory: same type, same name."""
    params = {name: {p.name: p for p in cmd.params} for name, cmd in main.commands.items()}
    params["stats show"] = {p.name: p for p in main.commands["stats"].commands["show"].params}
    with_json = [name for name, ps in params.items() if "json_path" in ps]
    assert len(with_json) == 8 and all("overwrite" in params[n] for n in with_json)
    assert {params[n]["json_path"].opts[0] for n in with_json} == {"--json"}


def test_dtype_choices_come_from_the_enums():
    validate = {p.name: p for p in main.commands["validate"].params}
    calibrate = {p.name: p for p in main.commands["calibrate"].params}
    assert list(validate["compute_dtype"].type.choices) == [d.value for d in ComputeDtype]
    assert list(calibrate["compute_dtype"].type.choices) == [d.value for d in ComputeDtype]
    assert list(validate["activations"].type.choices) == [a.value for a in ActivationRows]


def test_the_group_closes_the_progress_bars_of_a_failed_command():
    from quantkit import cli
    from quantkit.cli.group import progress_bars
    from quantkit.errors import QuantkitError
    opened = []

    @click.group(cls=cli._Group)
    def group():
        pass

    @group.command()
    def work():
        progress = progress_bars(quiet=True)
        progress.stage("read", 10)
        opened.append(progress)
        raise QuantkitError("no such thing", path="x.safetensors", hint="pass another file")

    result = CliRunner().invoke(group, ["work"])
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and "no such thing" in result.output and result.output.count("\n") == 1
    assert opened and opened[0].bar is None


def test_python_m_quantkit_cli_runs_the_command():
    import subprocess
    r = subprocess.run([sys.executable, "-m", "quantkit.cli", "formats"], capture_output=True, text=True)
    assert r.returncode == 0 and "native" in r.stdout


# ----------------------------------------------------------------------------- validation

def test_quantkit_validate_is_the_function_and_validation_a_plain_module():
    import quantkit.validation as validation
    assert type(validation) is types.ModuleType
    assert quantkit.validate is validation.validate
    assert quantkit.ValidateOptions is ValidateOptions


def test_validate_options_are_frozen_enums():
    o = ValidateOptions(compute_dtype="bf16", activations="all")
    assert o.compute_dtype is ComputeDtype.BF16 and o.activations is ActivationRows.ALL
    with pytest.raises(Exception):
        o.min_sqnr = 3          # frozen
    assert ValidateOptions(activations="none", min_w8a8_sqnr=20).activations is ActivationRows.FILE
    assert ValidateOptions(min_output_sqnr=10).runs_model and not ValidateOptions().runs_model


@pytest.mark.parametrize("field, value, message", [
    ("activations", "static", "activations 'static': use one of none, file, all"),
    ("compute_dtype", "fp16", "compute_dtype 'fp16': use one of fp32, bf16"),
])
def test_validate_options_say_what_to_use(field, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ValidateOptions(**{field: value})


def test_validate_takes_options_or_their_fields_not_both(tmp_path):
    from quantkit.validation import validate
    with pytest.raises(TypeError, match="not both"):
        validate(str(tmp_path / "x.safetensors"), None, ValidateOptions(), min_sqnr=30)


# ----------------------------------------------------------------------------- plan as one call

def test_plan_source_is_what_quantkit_plan_shows(tmp_path):
    from quantkit.plan import plan_source
    g = torch.Generator().manual_seed(0)
    src = tmp_path / "m.safetensors"
    save_file({"blocks.0.ff.weight": torch.randn(64, 32, generator=g).to(torch.bfloat16),
               "blocks.0.norm.weight": torch.ones(32, dtype=torch.bfloat16)}, str(src))
    planned = plan_source(str(src), ConvertOptions())
    assert set(planned.sizes) == {"mixed", "compact"} and planned.joined == {} and planned.warnings == []
    r = CliRunner().invoke(main, ["plan", str(src), "--json", str(tmp_path / "plan.json")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "plan.json").read_text()) == json.loads(json.dumps(planned.to_dict()))


@pytest.mark.parametrize("args, usage", [([], "Usage: quantkit [OPTIONS] COMMAND"),
                                         (["stats"], "Usage: quantkit stats [OPTIONS] COMMAND")])
def test_a_group_asked_for_nothing_shows_its_whole_help_and_succeeds(args, usage):
    # it printed "error: Usage: ..." with exit 2, as if the user had typed something wrong
    result = CliRunner().invoke(main, args, prog_name="quantkit")
    assert result.exit_code == 0, result.output
    assert result.output.startswith(usage) and "Commands:" in result.output
    assert "error" not in result.output


def test_a_wrong_subcommand_is_still_a_one_line_usage_error():
    result = CliRunner().invoke(main, ["stats", "bogus"], prog_name="quantkit")
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == ["error: No such command 'bogus'. (see 'quantkit stats --help')"]
