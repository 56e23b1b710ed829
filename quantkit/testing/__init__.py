"""quantkit.testing: check anyone's FP8 (E4M3) quantization math against an independent reference.

    from quantkit.testing import check_quantizer
    check_quantizer(my_fn, "channel")      # my_fn(x) -> (codes, scale); raises naming the first bug

- ``reference``: E4M3FN / E5M2 encode and decode by integer bit arithmetic (numpy, no torch).
- ``conventions``: scales and codes as quantkit, compressed-tensors, torchao and ComfyUI compute them.
- ``strategies``: hypothesis strategies for weights, shapes, dtypes and every bf16 bit pattern.
- ``check_quantizer``: the battery, with failures that name the broken rule (``Rule``).

docs/testing.md has the guide.
"""
from .check import Report, check_case, check_quantizer, load_quantizer
from .conventions import Convention, Precision
from .rules import Failure, QuantizerCheckFailed, QuantizerSpecError, Rule, ScaleRule

__all__ = ["Convention", "Failure", "Precision", "QuantizerCheckFailed", "QuantizerSpecError", "Report", "Rule",
           "ScaleRule", "check_case", "check_quantizer", "load_quantizer"]
