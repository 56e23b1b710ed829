"""Validate at the model's output: run the source model and its quantized copy on the same inputs.

Per-tensor SQNR says how well each weight survived; what a user cares about is what the model
computes. This builds the architecture named by the ``config.json`` beside the source's
weights, offline, loads the source's weights and runs seeded random inputs through it; then
runs the same inputs through the quantized output, loaded the way its client loads it: a
compressed-tensors folder by transformers itself (``from_pretrained``, so a tensor the client
misreads shows at the output), the other formats dequantized by quantkit (W = q * scale, the
convention ComfyUI's loader applies). The two outputs (float32) are compared with the same
metrics as the tensors.

- transformers models (the class in ``architectures``): random token ids; the output is the
  logits or last hidden states.
- diffusers models (the class in ``_class_name``): latents, timesteps and text embeddings
  shaped from the config, one builder per class in ``quantkit.diffusion_inputs`` (FLUX.1 and
  its ControlNet, SD3, SD1.x/2.x/SDXL UNets, the KL VAE, Qwen-Image); the output is what the
  model predicts (every ControlNet residual, concatenated; the VAE's decoded image). Other
  classes are refused with the list of those covered.

Unlike the rest of quantkit this holds the whole model in memory: it is a check for models that
fit, run on request (``quantkit validate --model-output``). A transformers model peaks at twice
its float32 weights (the model's own parameters and the weights copied in); a diffusers model at
about once (weights assigned into an uninitialised model and freed between the two runs:
1.65 GB peak RSS for a 1.13 GB float32 FLUX-like model, 2.85 GB without the freeing).
"""
from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

from .errors import QuantkitError, UnsupportedInputError, ValidationFailed
from .metrics import ErrorStats

TOKENS = 32
BATCH = 2


@dataclass(frozen=True)
class _Model:
    """A model ready to run on its inputs."""
    module: object
    architecture: str
    inputs: dict
    words: str                  # the inputs, described
    output: Callable            # the model's return value -> the tensor compared
    assign: bool                # diffusers: weights replace the uninitialised parameters, not copied into them
    missing_ok: frozenset       # parameters the weights may lack (tied to others)


def compare_model_output(source, output: str, *, seed: int = 0) -> dict:
    """Outputs of ``source`` (an opened checkpoint) and of the quantized ``output`` on the same
    seeded inputs: {"architecture", "inputs", "sqnr", "psnr", "cosine", "max_abs_error", "rel_l2"}."""
    import torch

    from .readback import load_dequantized
    # An output written under other names (the comfy formats' view of a diffusers model) runs
    # in the source's architecture once its tensors are renamed back (rows split, halves swapped).
    from .comfy_names import RenamedView
    view = source if isinstance(source, RenamedView) else None
    source = view.original if view else source
    model = _build(source, seed)
    reference = {name: source.read_tensor(info).float() for name, info in source.tensors.items()}
    y_ref = _run(model, reference, source.path)
    del reference
    _release(model)
    try:
        if not model.assign and _client_format(output) == "compressed-tensors":
            loader, y_q = "transformers (compressed-tensors)", _run_in_transformers(model, output)
        else:
            dequantized = {k: v.float() if v.is_floating_point() else v
                           for k, v in load_dequantized(output, dtype=torch.float32).items()}
            if view:
                from .comfy_names import to_source_names
                dequantized = to_source_names(dequantized, view)
            loader, y_q = "quantkit (W = q * scale)", _run(model, dequantized, output)
    except UnsupportedInputError as exc:     # the source ran: the output is what is broken
        raise ValidationFailed(f"the output does not run: {exc.message}", path=output,
                               hint="re-run quantkit convert") from None
    stats = ErrorStats().update(y_ref.float(), y_q.float())
    rel = float((y_q.float() - y_ref.float()).norm() / y_ref.float().norm().clamp_min(1e-30))
    return {"architecture": model.architecture, "inputs": model.words, "loaded_by": loader,
            "output_shape": list(y_ref.shape), "sqnr": stats.sqnr, "psnr": stats.psnr, "cosine": stats.cosine,
            "max_abs_error": stats.max_abs_error, "rel_l2": rel}


def _client_format(output: str) -> str | None:
    """The format ``output`` was written in (its metadata), None when it cannot be told."""
    from .formats import detect_format
    from .readback import open_output
    try:
        with open_output(output) as f:
            return detect_format(f).name
    except QuantkitError:
        return None


def _run_in_transformers(model: _Model, output: str):
    """The quantized model's output as its client computes it: transformers loads the folder
    itself (``from_pretrained``, compressed-tensors decompressing at the first forward), in
    float32 like the reference, so a tensor the client misreads (FP8 codes taken as weights)
    shows at the output."""
    import torch
    with _quiet_clients():
        try:
            module = type(model.module).from_pretrained(output, dtype=torch.float32, local_files_only=True).eval()
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
            raise UnsupportedInputError(f"transformers cannot load it ({type(exc).__name__}: "
                                        f"{str(exc).strip()[:200]})", path=output) from exc
        with torch.no_grad():
            try:
                out = module(**model.inputs)
            except (RuntimeError, ValueError, TypeError, IndexError) as exc:
                raise UnsupportedInputError(f"{model.architecture} does not run as transformers loads it "
                                            f"({type(exc).__name__}: {str(exc).strip()[:200]})", path=output) from exc
    return model.output(out).detach().clone()


@contextmanager
def _quiet_clients():
    """transformers' and compressed-tensors' info logs and progress bars off while they load a
    model for quantkit (not the user's business; their errors still raise)."""
    from transformers.utils import logging as hf_logging
    level, bars = hf_logging.get_verbosity(), os.environ.get("TQDM_DISABLE")
    hf_logging.set_verbosity_error()
    os.environ["TQDM_DISABLE"] = "1"        # compressed-tensors draws its own tqdm bars
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = bars


def check_model_output(source) -> None:
    """Refuse, before any other work, a source whose outputs cannot be compared: no config.json,
    or a diffusers class without inputs."""
    folder = _config_folder(source)
    raw = _read_config(folder)
    if "_class_name" in raw:
        from .diffusion_inputs import check_supported
        check_supported(raw["_class_name"], folder)


def _config_folder(source) -> str:
    folder = os.path.dirname(os.path.abspath(source.files[0]))
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise UnsupportedInputError("--model-output needs the model's config.json beside the source's weights",
                                    path=folder, hint="validate a model folder (config.json + weights)")
    return folder


def _build(source, seed: int) -> _Model:
    """The architecture named by the config (a diffusers ``_class_name`` or transformers
    ``architectures``), with weights to be replaced before any use, and its inputs."""
    folder = _config_folder(source)
    raw = _read_config(folder)
    if "_class_name" in raw:
        return _diffusers_model(folder, raw, seed)
    return _transformers_model(folder, seed)


def _read_config(folder: str) -> dict:
    """The model's config.json as a JSON object; a broken one is bad input, named."""
    path = os.path.join(folder, "config.json")
    try:
        with open(path, "rb") as f:
            raw = json.loads(f.read(10_000_000).decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UnsupportedInputError(f"config.json is unreadable ({type(exc).__name__}: {exc})", path=path,
                                    hint="fix or replace the model's config.json") from None
    if not isinstance(raw, dict):
        raise UnsupportedInputError("config.json is not a JSON object", path=path,
                                    hint="fix or replace the model's config.json")
    return raw


def _transformers_model(folder: str, seed: int) -> _Model:
    import transformers
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
        if cls is None:
            cls, arch = transformers.AutoModel, f"AutoModel({config.model_type})"
            model = cls.from_config(config)
        else:
            model = cls(config)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UnsupportedInputError(f"transformers cannot build a model from config.json "
                                    f"({type(exc).__name__}: {str(exc).strip()[:200]})", path=folder,
                                    hint="fix the config.json beside the weights, or validate per tensor "
                                         "(without --model-output)") from None
    model.eval()
    return _Model(model, arch, _token_inputs(model, seed), f"{BATCH}x{TOKENS} random token ids (seed {seed})",
                  _first_tensor, assign=False, missing_ok=frozenset(getattr(model, "_tied_weights_keys", None) or ()))


def _diffusers_model(folder: str, raw: dict, seed: int) -> _Model:
    """The diffusers class named by ``_class_name``, built from the config with its parameters
    allocated but not initialised: the source's weights are assigned over them, so a big model
    does not pay for a random init. Not on the meta device: some models compute tensors at
    construction that are not parameters (Qwen-Image's RoPE tables), and those must be real."""
    from .diffusion_inputs import check_supported, diffusion_inputs
    name = raw["_class_name"]
    check_supported(name, folder)
    import diffusers
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise UnsupportedInputError(f"diffusers {diffusers.__version__} has no {name}", path=folder,
                                    hint="upgrade diffusers")
    with warnings.catch_warnings(), _no_init_weights():
        warnings.simplefilter("ignore", FutureWarning)   # diffusers' own deprecations, e.g. inside FluxControlNetModel
        try:
            model = cls.from_config(raw).eval()
        except (TypeError, ValueError) as exc:
            raise UnsupportedInputError(f"diffusers cannot build {name} from this config ({exc})", path=folder,
                                        hint="validate it per tensor (without --model-output)") from exc
    inputs = diffusion_inputs(name, model.config, seed, path=folder)
    return _Model(model, name, {**inputs.kwargs, "return_dict": False}, f"{inputs.words} (seed {seed})",
                  _every_tensor, assign=True, missing_ok=frozenset())


def _no_init_weights():
    """diffusers' switch that skips torch.nn.init during construction (a no-op where it is missing)."""
    try:
        from diffusers.models.modeling_utils import no_init_weights
    except ImportError:
        return nullcontext()
    return no_init_weights()


def _token_inputs(model, seed: int) -> dict:
    import inspect

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


def _run(model: _Model, state: dict, path: str):
    import torch
    module = model.module
    try:
        result = module.load_state_dict(state, strict=False, assign=model.assign)
    except RuntimeError as exc:      # a shape that does not fit
        raise UnsupportedInputError(f"the weights do not fit the config's architecture ({str(exc).strip()[:200]})",
                                    path=path, hint="the config.json beside the weights must describe this model")
    missing = [k for k in result.missing_keys if k not in model.missing_ok]
    buffers = {name for name, _ in module.named_buffers()}       # e.g. position_ids, no longer saved
    unexpected = [k for k in result.unexpected_keys if k not in buffers]
    if missing or unexpected:
        what = missing or unexpected
        raise UnsupportedInputError(f"the weights do not fit the config's architecture "
                                    f"({'missing' if missing else 'unexpected'}: {', '.join(what[:3])})",
                                    path=path, hint="the config.json beside the weights must describe this model")
    if hasattr(module, "tie_weights"):
        module.tie_weights()
    with torch.no_grad():
        try:
            out = module(**model.inputs)
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            raise UnsupportedInputError(f"{model.architecture} does not run on the inputs made from its config "
                                        f"({type(exc).__name__}: {str(exc).strip()[:200]})", path=path,
                                        hint="validate it per tensor (without --model-output)") from exc
    return model.output(out).detach().clone()


def _first_tensor(out):
    """A transformers model's output: the logits or last hidden states."""
    import torch
    return out[0] if isinstance(out, (tuple, list)) else next(v for v in out.values() if torch.is_tensor(v))


def _every_tensor(out):
    """A diffusers model's output (return_dict=False): its one tensor, or every tensor it returns
    (a ControlNet's residuals, nested tuples) flattened into one."""
    import torch
    if torch.is_tensor(out):
        return out
    tensors = [_every_tensor(item) for item in out]
    return tensors[0] if len(tensors) == 1 else torch.cat([t.flatten() for t in tensors])


def _release(model: _Model) -> None:
    """Free the reference weights before the quantized ones load: assigned parameters are the
    reference tensors themselves, so they become shapes without storage (the meta device)."""
    if model.assign:
        meta = {k: v.to("meta") for k, v in model.module.state_dict().items()}
        model.module.load_state_dict(meta, assign=True)
