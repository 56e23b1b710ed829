"""Third-party libraries quantkit drives, kept quiet while they work for it.

transformers logs infos and warnings while it builds a model or loads a tokenizer for quantkit
(unused weights, deprecated options), and it and compressed-tensors draw progress bars while a
folder loads ("Loading weights", "Decompressing model"): not the user's business (quantkit draws
its own), and their errors still raise.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager


@contextmanager
def quiet_transformers(*, no_bars: bool = False):
    """transformers' logger at error level for the ``with`` block, its level restored after.
    ``no_bars``: the libraries' progress bars off too: transformers' own switch, and tqdm's class
    made to start disabled (compressed-tensors calls ``tqdm`` directly, with its own ``disable=``;
    ``TQDM_DISABLE`` is read once, when tqdm is imported, so setting it later does nothing)."""
    import tqdm
    from transformers.utils import logging as hf_logging
    level, bars_on = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    raw = tqdm.tqdm.__dict__["__init__"]      # the descriptor itself (tqdm's is a partialmethod), put back as it was
    hf_logging.set_verbosity_error()
    if no_bars:
        hf_logging.disable_progress_bar()
        tqdm.tqdm.__init__ = functools.partialmethod(_disabled, tqdm.tqdm.__init__)
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if no_bars:
            tqdm.tqdm.__init__ = raw
            if bars_on:
                hf_logging.enable_progress_bar()


def _disabled(self, init, *args, **kwargs):
    """tqdm's ``__init__`` with ``disable=True`` whatever the caller asked (compressed-tensors passes
    ``disable=not show_progress``), unless it came positionally (the 11th argument)."""
    if len(args) < 10:
        kwargs["disable"] = True
    init(self, *args, **kwargs)
