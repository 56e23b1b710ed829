"""``python -m quantkit.cli``: the ``quantkit`` command."""
from . import run

if __name__ == "__main__":
    run()
