"""The docstring examples that can run, run (those that need a checkpoint are marked +SKIP)."""
import doctest
import importlib
import pkgutil

import pytest

import quantkit


def _modules():
    names = ["quantkit"]
    for info in pkgutil.walk_packages(quantkit.__path__, prefix="quantkit."):
        names.append(info.name)
    import quantkit.calibration as calibration      # installed from the top-level calibration/ folder
    names += [calibration.__name__] + [info.name for info in pkgutil.iter_modules(calibration.__path__,
                                                                                   prefix="quantkit.calibration.")]
    return sorted(set(names))


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} docstring examples failed"


def test_some_examples_do_run():
    attempted = sum(doctest.testmod(importlib.import_module(n), verbose=False).attempted
                    for n in ("quantkit", "quantkit.fp8", "quantkit.destinations", "quantkit.options"))
    assert attempted >= 3
