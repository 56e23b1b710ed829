"""``python -m quantkit.cli``: the ``quantkit`` command."""
from . import run

run()
