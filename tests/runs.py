"""Shared by the tests: the CLI in-process (``run``), file hashes (``sha256``), and, for the tests that
stop or starve a real `quantkit convert` subprocess (test_signals.py, test_disk_full.py, test_kill.py),
its source, its command line and its outputs."""
import hashlib
import json
import os
import sys

import torch
from safetensors.torch import save_file

from click.testing import CliRunner

from quantkit.cli import main
from quantkit.writer import TEMP_MARK

# Output kinds: name under the destination folder, extra convert options.
OUTPUTS = {"file": ("out.safetensors", []),
           "shards": ("out-sharded", ["--max-shard-size", "8MB", "--jobs", "1"]),
           "shards-jobs": ("out-sharded", ["--max-shard-size", "8MB", "--jobs", "2"]),   # worker processes
           "compressed-tensors": ("out-ct", ["--format", "compressed-tensors"])}


def run(*args):
    """``quantkit ARGS`` in-process (click's runner); an exception that is not an exit propagates."""
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def partials(folder) -> list[str]:
    """Every temporary file or folder under ``folder``."""
    return sorted(os.path.join(r, n) for r, dirs, files in os.walk(folder) for n in dirs + files if TEMP_MARK in n)


def llama_like_source(folder):
    """A ~64 MB BF16 Llama-like model folder (config.json, as compressed-tensors needs); its weights' path."""
    g = torch.Generator().manual_seed(0)
    save_file({f"model.layers.{i}.mlp.{p}.weight": torch.randn(1024, 1024, generator=g).to(torch.bfloat16)
               for i in range(16) for p in ("up_proj", "down_proj")}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    return folder / "model.safetensors"


def convert_cmd(source, out, extra) -> list[str]:
    return [sys.executable, "-m", "quantkit.cli", "convert", str(source), str(out), "-q", *extra]


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (Linux: /proc), or [] when it is gone."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def alive(pid: int) -> bool:
    """``pid`` runs (a zombie, dead but not reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def write_random_source(keys: dict, path, seed_name: str):
    """Random BF16 weights of ``keys`` (name -> shape) at a sane scale (1/sqrt(fan-in)), norms near
    1, small biases, seeded by ``seed_name``; written to ``path``, which is returned."""
    g = torch.Generator().manual_seed(sum(map(ord, seed_name)))
    tensors = {}
    for key, shape in keys.items():
        if len(shape) >= 2:
            t = torch.randn(*shape, generator=g) / max(1, torch.tensor(shape[1:]).prod().item()) ** 0.5
        elif key.endswith("weight") or "norm" in key:
            t = 1 + 0.1 * torch.randn(*shape, generator=g)
        else:
            t = 0.02 * torch.randn(*shape, generator=g)
        tensors[key] = t.to(torch.bfloat16)
    save_file(tensors, str(path))
    return path
