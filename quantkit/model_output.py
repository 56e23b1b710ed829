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

from .errors import OptionsError, QuantkitError, UnsupportedInputError, ValidationFailed
from .jsonfiles import JSONFileError, read_json
from .metrics import ErrorStats
from .models import Model, build_model, config_folder, read_model_config, run_model
from .quiet import quiet_transformers

ACTIVATIONS = ("none", "file", "all")      # which rows compare_model_output runs (see the module docstring)
RUNTIME = "quantkit.runtime (streamed, W = q * scale)"
# Row name -> (runtime activations option, what the row is).
ROWS = {"weight-only": ("none", "weight-only: FP8 weights, inputs as they come"),
        "file": ("file", "W8A8 as the file implies (static input_scale where present)"),
        "unit": ("unit", "W8A8 with input scale 1.0 (ComfyUI without input_scale)"),
        "dynamic": ("dynamic", "W8A8 with a dynamic scale per token")}


def compare_model_output(source, output: str, *, seed: int = 0, compute_dtype: str = "fp32",
                         activations: str = "file", max_memory: int | None = None) -> dict:
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
    ``loaded_by``. ``max_memory`` (bytes): each model runs in the runtime's budget mode instead, as
    many blocks resident as it holds."""
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
    y_ref, peaks["source"], _ = run_model(model, original, source.path, dtype, max_memory=max_memory)
    try:
        rows = _rows(model, output, dtype, activations, y_ref, peaks, max_memory)
    except OptionsError:             # a --max-memory the output's blocks do not fit: the user's to change
        raise
    except QuantkitError as exc:     # the source ran: the output is what is broken
        raise ValidationFailed(f"the output does not run: {exc.message}", path=output, tensor=exc.tensor,
                               hint=exc.hint or "re-run quantkit convert") from None
    first = rows[0]
    return {"architecture": model.architecture, "inputs": model.words, "loaded_by": first["loaded_by"],
            "compute_dtype": compute_dtype, "weights_peak_bytes": peaks, "output_shape": list(y_ref.shape),
            **{k: first[k] for k in ("sqnr", "psnr", "cosine", "max_abs_error", "rel_l2")},
            "activations": activations, "rows": rows}


def _rows(model: Model, output: str, dtype, activations: str, y_ref, peaks: dict,
          max_memory: int | None = None) -> list[dict]:
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
            y, peak, inputs = run_model(model, output, output, dtype, option, skip_weight_only=name != "weight-only",
                                        max_memory=max_memory)
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
    folder = output if os.path.isdir(output) else os.path.dirname(os.path.abspath(output))
    try:
        config = read_json(os.path.join(folder, "config.json")).get("quantization_config") or {}
    except (OSError, JSONFileError, AttributeError):
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
    with quiet_transformers(no_bars=True):    # compressed-tensors draws its own tqdm bars
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


def check_model_output(source) -> None:
    """Refuse, before any other work, a source whose outputs cannot be compared: no config.json,
    or a diffusers class without inputs."""
    folder = config_folder(source)
    raw = read_model_config(folder)
    if "_class_name" in raw:
        from .diffusion_inputs import check_supported
        check_supported(raw["_class_name"], folder)


