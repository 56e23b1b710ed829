"""Run what you convert: load an FP8 checkpoint into a model and run it, FP8 at rest.

    >>> import torch, quantkit.runtime as qr                                     # doctest: +SKIP
    >>> with qr.empty_weights():                                                 # doctest: +SKIP
    ...     model = FluxTransformer2DModel.from_config(config)
    >>> qr.load(model, "flux1-dev-fp8.safetensors", mode="streamed", compute_dtype=torch.bfloat16)  # doctest: +SKIP
    >>> model.quantkit_runtime.summary()                                         # doctest: +SKIP

- ``loader``: ``load`` and ``empty_weights``; what was loaded is ``module.quantkit_runtime``.
- ``weights``: a quantized weight is its FP8 codes and scale (buffers), dequantized on each use.
- ``streaming``: streamed mode, block by block from disk, the next block read meanwhile, and copied
  to the model's device (``device=``; on CUDA on a side stream).
- ``load(..., host_memory="16GB")``: streamed blocks kept in pinned host memory while they fit, copied
  to a CUDA device from there; skipped on the CPU and on a torch without CUDA, the reason stated in
  ``module.quantkit_runtime.pinned``.
- ``budget``: budget mode (``mode="budget", max_memory="8GB"``): the blocks that fit stay resident,
  the rest stream; which and why in ``module.quantkit_runtime.residency``.
- ``pool``: ``Pool(max_memory=...)``, several models in one budget, blocks kept while they fit (idle
  models' least recently used evicted first: what stays is stable from call to call).
- ``placements``: where each module tensor lies in the checkpoint (the one adapter to the read and
  format stages, ComfyUI names mapped back).

Layer: below read-back, validation and model output; above formats and readers. Nothing here prints
or needs a GPU (``device="cuda"`` uses one where there is one). By default every device dequantizes
into the compute dtype and runs the layer's own op (``weights.dequantized``); ``load(...,
matmul="fp8")`` makes ``nn.Linear`` layers with E4M3 weights multiply the stored codes with
``torch._scaled_mm`` (``weights.scaled_forward``: W8A8 with a dynamic per-tensor activation scale;
CPU and CUDA). ``RuntimeInfo.kernels`` says which path ran. ``load(...,
activations="file"|"unit"|"dynamic")`` also quantizes those layers' inputs to E4M3 and back
(``weights.InputQuant``: the file's static ``input_scale``, 1.0, or per token), the FP8 activations
of a GPU client simulated on CPU; ``RuntimeInfo.inputs`` counts the layers by scheme. torchao's
Float8Tensor is not used.
"""
from __future__ import annotations

from .budget import Plan
from .loader import Mode, RuntimeInfo, empty_weights, load, tensor_bytes
from .pool import Pool
from .streaming import stream_units
from .weights import Activations, InputQuant

__all__ = ["Activations", "InputQuant", "Mode", "Plan", "Pool", "RuntimeInfo", "empty_weights", "load", "stream_units",
           "tensor_bytes"]
