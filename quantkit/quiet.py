"""Third-party libraries quantkit drives, kept quiet while they work for it.

transformers logs infos and warnings while it builds a model or loads a tokenizer for quantkit
(unused weights, deprecated options): not the user's business, and their errors still raise.
"""
from __future__ import annotations

import os
from contextlib import contextmanager


@contextmanager
def quiet_transformers(*, no_bars: bool = False):
    """transformers' logger at error level for the ``with`` block, its level restored after.
    ``no_bars``: tqdm's progress bars off too (``TQDM_DISABLE``; compressed-tensors draws its own
    while transformers loads a folder)."""
    from transformers.utils import logging as hf_logging
    level, bars = hf_logging.get_verbosity(), os.environ.get("TQDM_DISABLE")
    hf_logging.set_verbosity_error()
    if no_bars:
        os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if no_bars:
            if bars is None:
                os.environ.pop("TQDM_DISABLE", None)
            else:
                os.environ["TQDM_DISABLE"] = bars
