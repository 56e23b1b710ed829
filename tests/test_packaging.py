"""pyproject.toml lists its packages explicitly (calibration/ is installed as quantkit.calibration):
every package folder must be in that list, or a non-editable install would leave it out."""
import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_every_package_folder_is_installed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "quantkit").rglob("__init__.py")}
    found |= {"quantkit.calibration"} if (ROOT / "calibration" / "__init__.py").exists() else set()
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"
    assert config["package-dir"]["quantkit.calibration"] == "calibration"
