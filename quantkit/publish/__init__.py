"""Publishing: a quantkit output as a release folder that others can check, and the check.

    publish(OUT, DIR, PublishOptions(...)) -> PublishResult    (``build``: the release, verified before it is named)
    verify(DIR, against=SRC) -> VerifyReport                   (``verify``: what anyone can re-check)

The rest is what they share: the folder's names and SHA256SUMS (``release``), the output it is made
from (``output``), the source it is checked against (``source``), the record of how the weights were
made (``provenance``) and the model card rendered from it (``card``).
"""
from .build import PublishOptions, PublishResult, publish
from .verify import Problem, VerifyReport, verify

__all__ = ["Problem", "PublishOptions", "PublishResult", "VerifyReport", "publish", "verify"]
