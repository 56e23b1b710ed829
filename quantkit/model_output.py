"""Validate at the model's output: run the source model and its quantized copy on the same inputs.

Per-tensor SQNR says how well each weight survived; what a user cares about is what the model
computes. This builds the architecture named by the ``config.json`` beside the source's
weights, offline and without memory (parameters on the meta device), loads the source into it
with ``quantkit.runtime`` in streamed mode (each block read from disk when it runs, dropped after)
and runs seeded random inputs through it; then drops it, builds it again and runs the same inputs
through the quantized output, loaded the way its client loads it: a compressed-tensors folder by
transformers itself (``from_pretrained``, so a tensor the client misreads shows at the output),
the other formats by the runtime (FP8 codes at rest, W = q * scale per block, the convention
ComfyUI's loader applies; ComfyUI's names mapped back onto the diffusers model). The two outputs
are compared with the same metrics as the tensors, in the compute dtype chosen (``fp32``
default, or ``bf16``).

- transformers models (the class in ``architectures``): random token ids; the output is the
  logits or last hidden states.
- diffusers models (the class in ``_class_name``): latents, timesteps and text embeddings
  shaped from the config, one builder per class in ``quantkit.diffusion_inputs`` (FLUX.1 and
  its ControlNet, SD3, SD1.x/2.x/SDXL UNets, the KL VAE, Qwen-Image); the output is what the
  model predicts (every ControlNet residual, concatenated; the VAE's decoded image). Other
  classes are refused with the list of those covered.

Activations (``rows``): the comparison above is weight-only (inputs as they come). A client that runs
FP8 matmuls (ComfyUI on an RTX 40/50 or H100, vLLM) also quantizes each FP8 Linear's input to E4M3;
``activations`` adds rows that simulate it on CPU (``quantkit.runtime.load(..., activations=)``:
x -> clamp(x / s, -448, 448) -> E4M3 -> * s, then the layer's op), each one more streamed run of
the quantized model: "file" (default) adds W8A8 as the file implies (its static ``input_scale``s;
ComfyUI's 1.0 for a comfy layer with neither a scale nor ``full_precision_matrix_mult``), a run
skipped when the file implies no activation quantization anywhere (the row is then weight-only's);
"all" adds W8A8 with scale 1.0 everywhere (ComfyUI without ``input_scale``: what calibration bought)
when the file has static scales, and W8A8 with a dynamic scale per token.

Memory: never both models, and of each about one block of weights plus the activations (the
runtime's streamed mode), so a checkpoint larger than the machine's memory can be validated at
its output. The compressed-tensors client path is the exception: transformers holds that model whole.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

from .errors import QuantkitError, UnsupportedInputError, ValidationFailed
from .metrics import ErrorStats

TOKENS = 32
BATCH = 2
ACTIVATIONS = ("none", "file", "all")      # which rows compare_model_output runs (see the module docstring)
RUNTIME = "quantkit.runtime (streamed, W = q * scale)"
# Row name -> (runtime activations option, what the row is).
ROWS = {"weight-only": ("none", "weight-only: FP8 weights, inputs as they come"),
        "file": ("file", "W8A8 as the file implies (static input_scale where present)"),
        "unit": ("unit", "W8A8 with input scale 1.0 (ComfyUI without input_scale)"),
        "dynamic": ("dynamic", "W8A8 with a dynamic scale per token")}


@dataclass(frozen=True)
class Model:
    """An architecture ready to be built (without memory) and run on its inputs."""
    make: Callable              # () -> a fresh module, parameters on the meta device (runtime.empty_weights)
    module_class: type
    architecture: str
    transformers: bool          # a transformers model (its client can load a compressed-tensors folder)
    inputs: dict
    words: str                  # the inputs, described
    output: Callable            # the model's return value -> the tensor compared


def compare_model_output(source, output: str, *, seed: int = 0, compute_dtype: str = "fp32",
                         activations: str = "file") -> dict:
    """Outputs of ``source`` (an opened checkpoint) and of the quantized ``output`` on the same
    seeded inputs: {"architecture", "inputs", "loaded_by", "sqnr", "psnr", "cosine", "max_abs_error",
    "rel_l2", ..., "rows"}; the top-level metrics are the weight-only row's.

    Each model is built without memory and loaded by ``quantkit.runtime`` in streamed mode (one block
    in memory at a time; FP8 weights stay FP8 and are dequantized into ``compute_dtype``, ``fp32`` or
    ``bf16``), run, and dropped before the other is built: peak memory is about a block and the
    activations, whatever the model's size. Only the outputs are kept. A compressed-tensors output is
    loaded by transformers itself instead (its client), whole.

    ``activations`` ("none", "file" default, "all"): which rows of FP8 activation quantization are
    simulated besides weight-only (module docstring); ``rows`` lists each with its metrics and
    ``loaded_by``."""
    import torch

    from .comfy_names import RenamedView
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations {activations!r}: use one of {', '.join(ACTIVATIONS)}")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[compute_dtype]
    # The runtime maps an output written under ComfyUI's names back onto the diffusers model itself;
    # the source is read under its own names.
    original = source.original if isinstance(source, RenamedView) else source
    model = build_model(original, seed)
    peaks = {}
    y_ref, peaks["source"], _ = _run(model, original, source.path, dtype)
    try:
        rows = _rows(model, output, dtype, activations, y_ref, peaks)
    except QuantkitError as exc:     # the source ran: the output is what is broken
        raise ValidationFailed(f"the output does not run: {exc.message}", path=output, tensor=exc.tensor,
                               hint=exc.hint or "re-run quantkit convert") from None
    first = rows[0]
    return {"architecture": model.architecture, "inputs": model.words, "loaded_by": first["loaded_by"],
            "compute_dtype": compute_dtype, "weights_peak_bytes": peaks, "output_shape": list(y_ref.shape),
            **{k: first[k] for k in ("sqnr", "psnr", "cosine", "max_abs_error", "rel_l2")},
            "activations": activations, "rows": rows}


def _rows(model: Model, output: str, dtype, activations: str, y_ref, peaks: dict) -> list[dict]:
    """The rows ``activations`` asks for, weight-only first, each compared with ``y_ref``."""
    client = model.transformers and _loaded_by_transformers(output)
    # transformers runs a compressed-tensors folder with its own fake quantization of the inputs where the
    # folder's scheme has input activations (compressed-tensors' forward_quantize, on CPU too): that run is
    # the "file" row then, and the weight-only one comes from the runtime.
    client_row = ("file" if _ct_input_activations(output) else "weight-only") if client else None
    wanted = ["weight-only"] + (["file"] if activations != "none" else [])
    rows, static = [], False
    while wanted:
        name = wanted.pop(0)
        option, what = ROWS[name]
        if name == client_row:
            y, loaded_by, inputs = _run_in_transformers(model, output, dtype), "transformers (compressed-tensors)", None
        else:
            y, peak, inputs = _run(model, output, output, dtype, option, skip_weight_only=name != "weight-only")
            if name == "weight-only":
                peaks["output"] = peak
            loaded_by = f"{RUNTIME}; inputs: {_schemes(inputs)}" if option != "none" else RUNTIME
        row = {"row": name, "what": what, "loaded_by": loaded_by, "inputs": inputs}
        if y is None:         # nothing the file holds quantizes an input: this row is weight-only's
            row.update({k: rows[0][k] for k in ("sqnr", "psnr", "cosine", "max_abs_error", "rel_l2")},
                       same_as="weight-only")
        else:
            row.update(_metrics(y_ref, y))
        rows.append(row)
        if name == "file":
            static = bool(inputs and inputs.get("static")) or (name == client_row)
            if activations == "all":
                wanted += (["unit"] if static else []) + ["dynamic"]
    return rows


def _schemes(inputs: dict | None) -> str:
    """{"static": 12, "none": 3} -> "12 static, 3 none" (FP8 Linear layers by input scheme)."""
    return ", ".join(f"{n} {k}" for k, n in sorted((inputs or {}).items(), key=lambda kv: -kv[1])) or "no FP8 Linear"


def _metrics(y_ref, y) -> dict:
    stats = ErrorStats().update(y_ref.float(), y.float())
    rel = float((y.float() - y_ref.float()).norm() / y_ref.float().norm().clamp_min(1e-30))
    return {"sqnr": stats.sqnr, "psnr": stats.psnr, "cosine": stats.cosine, "max_abs_error": stats.max_abs_error,
            "rel_l2": rel}


def _ct_input_activations(output: str) -> bool:
    """Whether a compressed-tensors folder's scheme quantizes input activations (W8A8)."""
    import json
    folder = output if os.path.isdir(output) else os.path.dirname(os.path.abspath(output))
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            config = json.load(f).get("quantization_config") or {}
    except (OSError, ValueError, AttributeError):
        return False
    groups = config.get("config_groups") if isinstance(config, dict) else None
    return isinstance(groups, dict) and any(isinstance(g, dict) and g.get("input_activations")
                                            for g in groups.values())


def _loaded_by_transformers(output: str) -> bool:
    """Whether transformers loads ``output`` itself (its format, told by its metadata, says so);
    False when the format cannot be told."""
    from .formats import detect_format
    from .readback import open_output
    try:
        with open_output(output) as f:
            return detect_format(f).loaded_by_transformers
    except QuantkitError:
        return False


def _run_in_transformers(model: Model, output: str, dtype):
    """The quantized model's output as its client computes it: transformers loads the folder
    itself (``from_pretrained``, compressed-tensors decompressing at the first forward), in
    float32 like the reference, so a tensor the client misreads (FP8 codes taken as weights)
    shows at the output."""
    import torch
    with _quiet_clients():
        try:
            module = model.module_class.from_pretrained(output, dtype=dtype, local_files_only=True).eval()
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


def build_model(source, seed: int = 0, *, with_inputs: bool = True) -> Model:
    """The architecture named by the config beside ``source``'s weights (a diffusers
    ``_class_name`` or transformers ``architectures``), as a factory of modules without memory
    (``make()``), with its seeded inputs (``inputs``) and the tensor it outputs (``output``).
    ``with_inputs=False``: without inputs (``inputs`` empty), for callers that bring their own
    (calibration), so a diffusers class without an input builder builds too."""
    folder = _config_folder(source)
    raw = _read_config(folder)
    if "_class_name" in raw:
        return _diffusers_model(folder, raw, seed, with_inputs)
    return _transformers_model(folder, seed)


def _read_config(folder: str) -> dict:
    from .checkpoint import read_config
    return read_config(os.path.join(folder, "config.json"))


def _transformers_model(folder: str, seed: int) -> Model:
    import transformers

    from .runtime import empty_weights
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
        if cls is None:
            arch = f"AutoModel({config.model_type})"

        def make():
            with empty_weights():
                return (cls(config) if cls is not None else transformers.AutoModel.from_config(config)).eval()
        probe = make()
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UnsupportedInputError(f"transformers cannot build a model from config.json "
                                    f"({type(exc).__name__}: {str(exc).strip()[:200]})", path=folder,
                                    hint="fix the config.json beside the weights, or validate per tensor "
                                         "(without --model-output)") from None
    return Model(make, type(probe), arch, True, _token_inputs(probe, seed),
                  f"{BATCH}x{TOKENS} random token ids (seed {seed})", _first_tensor)


def _diffusers_model(folder: str, raw: dict, seed: int, with_inputs: bool = True) -> Model:
    """The diffusers class named by ``_class_name``, built from the config with its parameters on
    the meta device (the runtime fills them) and its buffers real: some models compute tensors at
    construction that are not parameters (Qwen-Image's RoPE tables)."""
    from .diffusion_inputs import check_supported, diffusion_inputs
    from .runtime import empty_weights
    name = raw["_class_name"]
    if with_inputs:
        check_supported(name, folder)
    import diffusers
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise UnsupportedInputError(f"diffusers {diffusers.__version__} has no {name}", path=folder,
                                    hint="upgrade diffusers")

    def make():
        with warnings.catch_warnings(), empty_weights():
            warnings.simplefilter("ignore", FutureWarning)   # diffusers' own deprecations (FluxControlNetModel)
            return cls.from_config(raw).eval()
    try:
        probe = make()
    except (TypeError, ValueError) as exc:
        raise UnsupportedInputError(f"diffusers cannot build {name} from this config ({exc})", path=folder,
                                    hint="validate it per tensor (without --model-output)") from exc
    if not with_inputs:
        return Model(make, cls, name, False, {}, "", _every_tensor)
    inputs = diffusion_inputs(name, probe.config, seed, path=folder)
    return Model(make, cls, name, False, {**inputs.kwargs, "return_dict": False}, f"{inputs.words} (seed {seed})",
                  _every_tensor)


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


def _run(model: Model, weights, path: str, dtype, activations: str = "none", skip_weight_only: bool = False):
    """``model`` built afresh, loaded from ``weights`` (an opened checkpoint or an output's path) by
    the runtime in streamed mode with its ``activations`` option, run on its inputs, and dropped:
    (its output, the peak bytes of weights it held, the FP8 Linear layers by input scheme). With
    ``skip_weight_only``, a load that quantizes no input is not run (output None)."""
    import torch
    with streamed(model, weights, path, dtype, activations) as module:
        info = module.quantkit_runtime
        schemes = dict(info.inputs)
        if skip_weight_only and not set(schemes) - {"none"}:
            return None, info.peak_bytes, schemes
        inputs = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v
                  for k, v in model.inputs.items()}          # the same seeded values, in the compute dtype
        with torch.no_grad():
            try:
                out = module(**inputs)
            except (RuntimeError, ValueError, TypeError, IndexError) as exc:
                raise UnsupportedInputError(f"{model.architecture} does not run on the inputs made from its config "
                                            f"({type(exc).__name__}: {str(exc).strip()[:200]})", path=path,
                                            hint="validate it per tensor (without --model-output)") from exc
        return model.output(out).detach().float().clone(), info.peak_bytes, schemes


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


@contextmanager
def streamed(model: Model, weights, path: str, dtype, activations: str = "none"):
    """``model`` built afresh and loaded from ``weights`` (an opened checkpoint or a path) by the runtime
    in streamed mode (``activations``: the runtime's option), for the ``with`` block (validation runs
    it, calibration hooks and runs it); closed and dropped after.

    >>> with streamed(build_model(source), source, source.path, torch.float32) as module:   # doctest: +SKIP
    ...     module(**inputs)
    """
    import gc

    from .errors import ModelMismatchError
    from .runtime import load
    module = model.make()
    try:
        try:
            load(module, weights, mode="streamed", compute_dtype=dtype, activations=activations)
        except ModelMismatchError as exc:
            raise UnsupportedInputError(f"the weights do not fit the config's architecture ({exc.message})",
                                        path=path, hint="the config.json beside the weights must describe "
                                                        "this model") from None
        yield module
    finally:
        info = getattr(module, "quantkit_runtime", None)
        if info is not None:
            info.close()
        del module
        gc.collect()
