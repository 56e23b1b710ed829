"""Validate at the model's output: run the source model and its quantized copy on the same inputs.

Per-tensor SQNR says how well each weight survived; what a user cares about is what the model
computes. For a transformers model (a folder, or weights with the ``config.json`` that names
its class in ``architectures``) this builds the architecture from the config, offline, loads
the source's weights and runs seeded random token ids through it; then loads the quantized
output dequantized (W = q * scale) and runs the same inputs again. The two outputs (logits or
last hidden states, float32) are compared with the same metrics as the tensors.

Unlike the rest of quantkit this holds the whole model in memory (twice the float32 weights):
it is a check for models that fit, run on request (``quantkit validate --model-output``).
Diffusion models need inputs of their own architecture (latents, timesteps, text embeddings);
they are not covered here (the test suite checks them against tiny real architectures).
"""
from __future__ import annotations

import inspect
import json
import os

from .errors import UnsupportedInputError
from .metrics import ErrorStats

TOKENS = 32
BATCH = 2


def compare_model_output(source, output: str, *, seed: int = 0) -> dict:
    """Outputs of ``source`` (an opened checkpoint) and of the quantized ``output`` on the same
    seeded inputs: {"architecture", "inputs", "sqnr", "psnr", "cosine", "max_abs_error", "rel_l2"}."""
    import torch
    from .validate import load_dequantized
    model, arch = _build(source)
    missing_ok = set(getattr(model, "_tied_weights_keys", None) or ())
    reference = {name: source.read_tensor(info).float() for name, info in source.tensors.items()}
    inputs = _inputs(model, seed)
    y_ref = _run(model, reference, inputs, source.path, missing_ok)
    del reference
    dequantized = {k: v.float() if v.is_floating_point() else v
                   for k, v in load_dequantized(output, dtype=torch.float32).items()}
    y_q = _run(model, dequantized, inputs, output, missing_ok)
    stats = ErrorStats().update(y_ref.float(), y_q.float())
    rel = float((y_q.float() - y_ref.float()).norm() / y_ref.float().norm().clamp_min(1e-30))
    return {"architecture": arch, "inputs": f"{BATCH}x{TOKENS} random token ids (seed {seed})",
            "output_shape": list(y_ref.shape), "sqnr": stats.sqnr, "psnr": stats.psnr, "cosine": stats.cosine,
            "max_abs_error": stats.max_abs_error, "rel_l2": rel}


def _config_folder(source) -> str:
    folder = os.path.dirname(os.path.abspath(source.files[0]))
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise UnsupportedInputError("--model-output needs the model's config.json beside the source's weights",
                                    path=folder, hint="validate a model folder (config.json + weights)")
    return folder


def _build(source):
    """The architecture named by the config, with random weights (replaced before any use)."""
    folder = _config_folder(source)
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        raw = json.load(f)
    if "_class_name" in raw:
        raise UnsupportedInputError(f"--model-output covers transformers models; {raw['_class_name']} is a "
                                    "diffusers model", path=folder,
                                    hint="validate it per tensor (without --model-output)")
    import transformers
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        cls, arch = transformers.AutoModel, f"AutoModel({config.model_type})"
        model = cls.from_config(config)
    else:
        model = cls(config)
    return model.eval(), arch


def _inputs(model, seed: int) -> dict:
    import torch
    gen = torch.Generator().manual_seed(seed)
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    if vocab <= 0:
        raise UnsupportedInputError(f"--model-output feeds token ids; {type(model).__name__} has no vocab_size",
                                    hint="validate it per tensor (without --model-output)")
    ids = torch.randint(0, vocab, (BATCH, TOKENS), generator=gen)
    params = inspect.signature(model.forward).parameters
    inputs = {"input_ids": ids}
    if "attention_mask" in params:
        inputs["attention_mask"] = torch.ones_like(ids)
    if getattr(model.config, "is_encoder_decoder", False) and "decoder_input_ids" in params:
        inputs["decoder_input_ids"] = ids[:, : TOKENS // 2]
    return inputs


def _run(model, state: dict, inputs: dict, path: str, missing_ok: set):
    import torch
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in missing_ok]
    buffers = {name for name, _ in model.named_buffers()}       # e.g. position_ids, no longer saved
    unexpected = [k for k in result.unexpected_keys if k not in buffers]
    if missing or unexpected:
        what = missing or unexpected
        raise UnsupportedInputError(f"the weights do not fit the config's architecture "
                                    f"({'missing' if missing else 'unexpected'}: {', '.join(what[:3])})",
                                    path=path, hint="the config.json beside the weights must describe this model")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    with torch.no_grad():
        out = model(**inputs)
    first = out[0] if isinstance(out, (tuple, list)) else next(v for v in out.values() if torch.is_tensor(v))
    return first.detach().clone()
