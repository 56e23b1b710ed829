"""Build and run a model from its ``config.json``: the architecture the config beside a checkpoint's
weights names (a transformers ``architectures`` class or a diffusers ``_class_name``), built offline
and without memory (parameters on the meta device), with seeded inputs shaped from the config, and
loaded by ``quantkit.runtime`` in streamed mode (one block in memory at a time) to run.

Validation at the model's output (``quantkit.model_output``), calibration (``quantkit.calibration``)
and sensitivity run models this way.

>>> model = build_model(source)                                             # doctest: +SKIP
>>> with streamed(model, source, source.path, torch.float32) as module:    # doctest: +SKIP
...     module(**model.inputs)
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

from .errors import UnsupportedInputError

TOKENS = 32
BATCH = 2


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


def config_folder(source) -> str:
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
    folder = config_folder(source)
    raw = read_model_config(folder)
    if "_class_name" in raw:
        return _diffusers_model(folder, raw, seed, with_inputs)
    return _transformers_model(folder, seed)


def read_model_config(folder: str) -> dict:
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


def run_model(model: Model, weights, path: str, dtype, activations: str = "none", skip_weight_only: bool = False,
              max_memory: int | None = None):
    """``model`` built afresh, loaded from ``weights`` (an opened checkpoint or an output's path) by
    the runtime in streamed mode (``max_memory``: budget mode) with its ``activations`` option, run on
    its inputs, and dropped: (its output, the peak bytes of weights it held, the FP8 Linear layers by
    input scheme). With ``skip_weight_only``, a load that quantizes no input is not run (output None)."""
    import torch
    with streamed(model, weights, path, dtype, activations, max_memory) as module:
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
def streamed(model: Model, weights, path: str, dtype, activations: str = "none", max_memory: int | None = None):
    """``model`` built afresh and loaded from ``weights`` (an opened checkpoint or a path) by the runtime
    in streamed mode (``activations``: the runtime's option), or with ``max_memory`` in budget mode (as
    many blocks resident as it holds, the rest streamed), for the ``with`` block (validation runs it,
    calibration hooks and runs it); closed and dropped after.

    >>> with streamed(build_model(source), source, source.path, torch.float32) as module:   # doctest: +SKIP
    ...     module(**inputs)
    """
    import gc

    from .errors import ModelMismatchError
    from .runtime import load
    module = model.make()
    try:
        try:
            load(module, weights, mode="budget" if max_memory else "streamed", compute_dtype=dtype,
                 activations=activations, max_memory=max_memory)
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
