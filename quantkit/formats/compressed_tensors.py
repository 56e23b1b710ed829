"""Format ``compressed-tensors``: a transformers / vLLM model folder with FP8 (E4M3) Linear weights.

``quantkit convert model/model.safetensors OUT --format compressed-tensors`` writes the folder OUT:

    OUT/model.safetensors   per quantized Linear <L>:
                              <L>.weight        F8_E4M3, the source's [out, in]
                              <L>.weight_scale  scale in the model's dtype D (see below):
                                                [1] per tensor | [out, 1] per channel |
                                                [ceil(out/128), ceil(in/128)] per 128x128 block
                              W = q * scale
                            every other tensor under its own key, as the plan says (kept floats in D,
                            non-floats untouched); metadata ``format: pt`` (transformers refuses
                            a safetensors file without it) plus quantkit's provenance, as ``native``
    OUT/config.json         the source folder's config.json with ``quantization_config`` (below)
                            and ``dtype`` / ``torch_dtype`` set to D
    OUT/...                 every other file of the source folder (tokenizer, vocab, generation
                            config, sentence-transformers files and subfolders such as 1_Pooling)
                            except weights (*.safetensors, *.bin, *.pt, *.pth, *.ckpt, *.h5,
                            *.msgpack, *.onnx, *.gguf, *.ot, *.index.json), hidden folders (.git,
                            .cache), quantkit manifests and quantkit output folders
    OUT/quantkit.json       quantkit's manifest: SHA256 of every file above (``quantkit validate``)

``quantization_config`` (compressed-tensors' schema, read by transformers' CompressedTensorsHfQuantizer
and vLLM's CompressedTensorsConfig)::

    {"quant_method": "compressed-tensors", "format": "naive-quantized", "quantization_status": "compressed",
     "config_groups": {"group_0": {"targets": ["Linear"], "format": "naive-quantized",
         "weights": {"num_bits": 8, "type": "float", "symmetric": true, "strategy": "tensor|channel|block",
                     "group_size": null, "block_structure": null | [128, 128], "dynamic": false,
                     "actorder": null, "observer": "minmax", "observer_kwargs": {}},
         "input_activations": null, "output_activations": null}},
     "ignore": [every Linear kept in high precision], "kv_cache_scheme": null,
     "global_compression_ratio": null, "sparsity_config": {}, "transform_config": {}}

- ``naive-quantized``: weight-only FP8. compressed-tensors' ``float-quantized`` compressor requires
  input activations in the scheme. With ``convert --stats`` (W8A8 static), each quantized Linear
  whose input was calibrated also holds ``<L>.input_scale`` ``[1]`` in D (range / 448), the group
  gets ``input_activations`` (``type float, num_bits 8, strategy tensor, dynamic false, symmetric
  true``) and both ``format`` fields become ``float-quantized``; quantized Linears the stats have no
  input range for go to a weight-only ``naive-quantized`` group ``group_1`` that names them (exact
  names take precedence over ``Linear`` in compressed-tensors and vLLM), and the top-level format
  is ``mixed-precision`` -- see ``quantization_config``.
- ``ignore`` names the module (key minus ``.weight``) of every 2-D ``.weight`` that is not
  quantized -- attention projections, embeddings, heads, ``lm_head`` -- plus ``lm_head`` when the
  file has no ``lm_head.weight`` (a head tied to the embeddings has no key of its own, and an
  unlisted one would be targeted as a Linear). compressed-tensors matches ignore entries by
  exact module name, so an entry naming no module is inert. Embeddings are listed although
  ``targets: ["Linear"]`` does not match ``nn.Embedding``: name-based consumers
  (``model_free_ptq``, which quantized embeddings into garbage) rely on the list.
- Only keys ``<module>.weight`` of rank 2 may be quantized (a Linear's weight); anything else is
  refused before conversion (``--keep`` it). Only E4M3 exists in the schema (``type float``,
  ``num_bits 8``): ``--fp8-dtype float8_e5m2`` is refused.

Scale dtype: the model's dtype D -- the keep dtype (``--keep-dtype``, BF16 by default; with
``source``, the float dtype holding most of the source's bytes) -- as compressed-tensors itself
writes them, and config.json's ``dtype`` is set to D so that transformers runs the model in D.
Why not float32 (which transformers and vLLM also accept): transformers loads a checkpoint two
ways, and only scales in the model's dtype make both equal to quantkit's own dequantization
(``fp8.dequantize``: q * scale formed in float32, then cast to the model's dtype) bit for bit:

- default (``dequantize=False``): compressed-tensors creates ``weight_scale`` in the module's
  dtype, so a float32 scale would be rounded to BF16 on load, and the weight decompresses as
  ``q.to(scale.dtype) * scale``.
- ``CompressedTensorsConfig(dequantize=True)``: the checkpoint's scale is used as stored,
  ``q.to(scale.dtype) * scale``, then cast to the model's dtype.

With scale and model both in D, both paths compute q * scale as one rounding of the exact product
(an E4M3 code times a BF16/FP16 scale is exact in float32) to D -- which is what quantkit's
dequantization computes. quantkit quantizes with the scale already rounded to D (``quantize._calibrate``),
so ``W = q * scale`` holds for what is on disk, and a scale that does not fit in D (an FP16
underflow) is an error naming the tensor. vLLM creates float32 scale parameters and upcasts D
exactly. Exception: FP8 codes carried over from an already-quantized source keep float32 scales
(the source's scale, unrounded: the conversion stays lossless).
"""
from __future__ import annotations

import json
import os
import shutil
from collections import Counter

from .. import dtypes
from ..checkpoint import read_config
from ..dtypes import Kind
from ..options import KeepDtype
from ..errors import FormatError, PolicyError, UnsupportedInputError
from ..fp8 import BLOCK_SIZE, E4M3FN, Granularity, scale_shape
from ..policy import Action, TensorKind
from ..jsonfiles import JSONFileError, read_json
from ..shards import MAX_INDEX_BYTES, is_index_name
from ..quiet import quiet_transformers
from ..writer import TEMP_MARK, OutputTensor
from .base import (Emit, OutputFormat, Plan, Role, StoredTensor, carried_input_scale, fp8_of, input_scale_key,
                   layer_name, quantkit_metadata, register, stored_with_scales, tensor_layout)

SCALE_SUFFIX = "_scale"
CONFIG_NAME = "config.json"
MANIFEST_NAME = "quantkit.json"   # quantkit.manifest.FOLDER_MANIFEST (not imported: no cycle)
# Beside a quantized Linear in files written by other tools (static activations, asymmetric).
AUX_SUFFIXES = (".input_scale", ".weight_zero_point", ".input_zero_point")
# Source-folder files that are weights (or point at weights) are not copied into the output.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".onnx_data",
                   ".gguf", ".ot", ".index.json")
# vLLM fuses these sibling projections into one layer and refuses mixed quantization among them.
FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("query", "key", "value"))


def granularity_from_shapes(weight_shape, scale_shape_) -> Granularity:
    """The granularity a compressed-tensors scale of ``scale_shape_`` encodes for ``weight_shape``
    (per tensor: ``[1]``; a 0-dim scale is read as per tensor too)."""
    if tuple(scale_shape_) in ((), (1,)):
        return Granularity.TENSOR
    for g in (Granularity.CHANNEL, Granularity.BLOCK):
        if tuple(scale_shape(tuple(weight_shape), g)) == tuple(scale_shape_):
            return g
    raise FormatError(f"scale shape {list(scale_shape_)} fits no granularity of a {list(weight_shape)} weight"
                     f" (compressed-tensors: [1], [out, 1] or [ceil(out/{BLOCK_SIZE}), ceil(in/{BLOCK_SIZE})])")


def model_dtype(plan) -> dtypes.DType:
    """D: the dtype the output's kept floats are stored in, in which the model runs and its scales are
    written. The keep dtype; for ``--keep-dtype source`` the float dtype holding most source bytes."""
    keep = plan.options.keep_dtype
    if keep is not KeepDtype.SOURCE:
        return keep.resolve(dtypes.F32)
    totals = Counter()
    for t in plan.tensors:
        if t.info.dtype.kind is Kind.FLOAT:
            totals[t.info.dtype.code] += t.info.nbytes
    return dtypes.BY_CODE[max(totals, key=totals.get)] if totals else dtypes.F32


def ignored_modules(plan) -> list[str]:
    """Every Linear kept in high precision: the module of each 2-D ``.weight`` not quantized, in file
    order, then ``lm_head`` if the file has no ``lm_head.weight`` (a tied head)."""
    names = [layer_name(t.name) for t in plan.tensors
             if t.name.endswith(".weight") and len(t.info.shape) == 2 and t.action is not Action.QUANTIZE]
    if not any(t.name == "lm_head.weight" for t in plan.tensors):
        names.append("lm_head")
    return names


def weight_args(granularity: Granularity) -> dict:
    """compressed-tensors ``QuantizationArgs`` of quantkit's weights: symmetric absmax E4M3, static.

    Only fields every compressed-tensors release that reads FP8 knows (``extra`` is forbidden):
    no ``scale_dtype`` / ``zp_dtype``, which 0.20 itself omits when unset."""
    return {"num_bits": 8, "type": "float", "symmetric": True, "strategy": granularity.value,
            "group_size": None,
            "block_structure": [BLOCK_SIZE, BLOCK_SIZE] if granularity is Granularity.BLOCK else None,
            "dynamic": False, "actorder": None, "observer": "minmax", "observer_kwargs": {}}


STATIC_INPUTS = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor", "group_size": None,
                 "dynamic": False, "actorder": None, "observer": "static_minmax", "observer_kwargs": {}}


def quantization_config(granularity: Granularity, ignore: list[str], *, input_scales: bool = False,
                        weight_only: list[str] = ()) -> dict:
    """config.json's ``quantization_config``.

    ``input_scales``: static FP8 activations (``<L>.input_scale`` ``[1]``, from ``convert --stats``):
    the scheme gains ``input_activations`` and the format becomes ``float-quantized``
    (compressed-tensors' FloatQuantizationCompressor requires activations). ``weight_only``: the
    quantized modules without an input scale, in a weight-only group of their own that names them
    (compressed-tensors and vLLM match a module's exact name before its class ``Linear``); the
    file's format is then ``mixed-precision``, each group carrying its own.
    """
    fmt = "float-quantized" if input_scales else "naive-quantized"
    groups = {"group_0": {"targets": ["Linear"], "format": fmt, "weights": weight_args(granularity),
                          "input_activations": dict(STATIC_INPUTS) if input_scales else None,
                          "output_activations": None}}
    if input_scales and weight_only:
        groups["group_1"] = {"targets": list(weight_only), "format": "naive-quantized",
                             "weights": weight_args(granularity), "input_activations": None,
                             "output_activations": None}
        fmt = "mixed-precision"
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
    }


def input_scale_bytes(scale: float, dtype: dtypes.DType) -> bytes:
    """``<L>.input_scale``'s bytes: the static activation scale (range / 448 as a power of two, or one
    carried over from an FP8 source) in the model's dtype D, as compressed-tensors creates the
    parameter (``initialize_qparams``: the scale dtype is the weight's). Rounded up to D's smallest
    normal if it would underflow (a coarser step, never clipping)."""
    import torch
    value = torch.tensor(scale, dtype=torch.float32).to(dtype.torch)
    if not bool(torch.isfinite(value)) or float(value) < torch.finfo(dtype.torch).tiny:
        value = torch.tensor(torch.finfo(dtype.torch).tiny, dtype=dtype.torch)
    return value.reshape(1).view(torch.uint8).numpy().tobytes()


def source_folder(source) -> str:
    """The folder of the source's weights (a model folder, a pipeline's component, a file's folder)."""
    return os.path.dirname(os.path.abspath(source.files[0]))


def read_source_config(source) -> dict:
    """The model config beside the source's weights; UnsupportedInputError when it is missing or unusable."""
    folder = source_folder(source)
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        raise UnsupportedInputError(
            "no config.json beside the source's weights: format compressed-tensors writes a transformers model "
            "folder and needs the model's config", path=folder,
            hint="put the model's config.json (and its tokenizer files) beside the weights, "
                 "or use --format native")
    config = read_config(path)
    if len(source.files) == 1:
        _refuse_shard(folder, os.path.basename(source.files[0]))
    return config


def _refuse_shard(folder: str, name: str) -> None:
    """One shard of a sharded checkpoint is not a model: the folder's config would describe weights
    the output does not hold."""
    for entry in sorted(os.listdir(folder)):
        if not entry.endswith(".safetensors.index.json"):
            continue
        try:
            files = set(read_json(os.path.join(folder, entry), MAX_INDEX_BYTES).get("weight_map", {}).values())
        except (OSError, JSONFileError, AttributeError):
            continue
        if name in files and len(files) > 1:
            raise UnsupportedInputError(
                f"the source is one of {len(files)} shards listed in {entry}: the output would be an "
                f"incomplete model", path=os.path.join(folder, name),
                hint="merge the shards into one .safetensors file first, or use --format native")


def _is_output_folder(path: str) -> bool:
    """A quantkit output (or one being written) inside the source folder: never copied."""
    return TEMP_MARK in os.path.basename(path) or os.path.isfile(os.path.join(path, MANIFEST_NAME))


def extra_files(source_folder: str, source_names, skip_folder: str | None = None) -> list[str]:
    """The source folder's files that go beside the weights, relative paths ('/'-separated), sorted:
    not the weights (``source_names``, any weight file or shard index), not quantkit's manifests."""
    source_names = {source_names} if isinstance(source_names, str) else set(source_names)
    skip_real = os.path.realpath(skip_folder) if skip_folder else None
    found = []
    for root, dirs, files in os.walk(source_folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not _is_output_folder(os.path.join(root, d))
                         and os.path.realpath(os.path.join(root, d)) != skip_real)
        rel_root = os.path.relpath(root, source_folder)
        for name in sorted(files):
            rel = name if rel_root == "." else os.path.join(rel_root, name).replace(os.sep, "/")
            if (name.lower().endswith(WEIGHT_SUFFIXES) or name == MANIFEST_NAME or is_index_name(name)
                    or name.endswith(".quantkit.json") or rel == CONFIG_NAME or rel in source_names):
                continue
            if os.path.isfile(os.path.join(root, name)):
                found.append(rel)
    return found


@register
class CompressedTensorsFormat(OutputFormat):
    name = "compressed-tensors"
    summary = ("folder for transformers / vLLM: <L>.weight F8_E4M3 + <L>.weight_scale (model dtype) "
               "+ config.json quantization_config (compressed-tensors, weight-only FP8)")
    folder = True
    weights_name = "model.safetensors"
    card_tags = ("compressed-tensors",)
    loaded_by_transformers = True

    def check(self, options) -> None:
        super().check(options)
        if options.fp8 is not E4M3FN:
            raise PolicyError(f"format {self.name!r} stores float8_e4m3fn only (compressed-tensors' FP8 type)",
                              hint="drop --fp8-dtype, or use --format native for float8_e5m2")

    def check_source(self, source) -> None:
        """Refuse a source this format cannot turn into a model folder (no config.json, one shard)."""
        read_source_config(source)

    def unreadable(self, source, tensors) -> dict[str, str]:
        """compressed-tensors decompresses the modules its ``targets: ["Linear"]`` match, by class
        name: an ``nn.Embedding`` (or GPT-2's ``Conv1D``) written as FP8 is loaded as its raw codes,
        without the scale. The module classes come from the model the config describes, built on the
        meta device; where that cannot be built, embeddings are recognised by name."""
        classes = module_classes(source)
        out = {}
        for t in tensors:
            module = layer_name(t.name)
            cls = _class_of(module, classes) if classes is not None else None
            if cls is not None and cls != "Linear":
                out[t.name] = f"its module is of class {cls}; {_LINEAR_ONLY}"
            elif cls is None and t.decision.kind is TensorKind.EMBEDDING:
                out[t.name] = f"an embedding; {_LINEAR_ONLY}"
        return out

    def check_plan(self, plan: Plan) -> None:
        bad = [t for t in plan.quantized() if not t.name.endswith(".weight") or len(t.info.shape) != 2]
        if bad:
            names = ", ".join(t.name for t in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise PolicyError(f"format {self.name!r} quantizes Linear weights only (2-D '<module>.weight'), "
                              f"not {names}", hint="keep them with --keep, or use --format native")

    def layout(self, plan: Plan) -> list[Emit]:
        scale_dtype = model_dtype(plan)
        g = plan.options.granularity

        def extras(t) -> list[Emit]:
            """``<L>.weight_scale`` (in D; float32 for an FP8 source's), ``<L>.input_scale`` with an activation scale."""
            shape = (1,) if g is Granularity.TENSOR else scale_shape(t.info.shape, g)
            dtype = dtypes.F32 if t.prequantized is not None else scale_dtype
            emits = [Emit(OutputTensor(t.name + SCALE_SUFFIX, dtype, shape), Role.SCALE, t.name)]
            input_scale = carried_input_scale(t, E4M3FN)
            if input_scale is not None:
                emits.append(Emit(OutputTensor(input_scale_key(t.name), scale_dtype, (1,)), Role.CONSTANT, t.name,
                                  input_scale_bytes(input_scale, scale_dtype)))
            return emits
        return tensor_layout(plan, extras)

    def metadata(self, plan, provenance: dict[str, str]) -> dict[str, str]:
        return {"format": "pt", **quantkit_metadata(self, plan, provenance,
                                                   **{"quantkit.scale_dtype": model_dtype(plan).code})}

    def finalize(self, folder: str, plan, source) -> list[str]:
        config = read_source_config(source)
        d = model_dtype(plan).torch_name
        config["dtype"] = d
        config["torch_dtype"] = d          # the older spelling, still read by older transformers/vLLM
        static = {t.name for t in plan.quantized() if carried_input_scale(t, E4M3FN) is not None}
        config["quantization_config"] = quantization_config(
            plan.options.granularity, ignored_modules(plan), input_scales=bool(static),
            weight_only=[layer_name(t.name) for t in plan.quantized() if t.name not in static])
        with open(os.path.join(folder, CONFIG_NAME), "w", encoding="utf-8") as f:
            f.write(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        src_folder = source_folder(source)
        names = [CONFIG_NAME]
        for rel in extra_files(src_folder, [os.path.basename(f) for f in source.files], skip_folder=folder):
            dst = os.path.join(folder, *rel.split("/"))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copyfile(os.path.join(src_folder, *rel.split("/")), dst)
            names.append(rel)
        return names

    def warnings(self, plan) -> list[str]:
        out = super().warnings(plan)
        q = {t.name for t in plan.quantized()}
        weights = {t.name for t in plan.tensors}
        for group in FUSED_SIBLINGS:
            parents = {w[: -len(f".{m}.weight")] for w in weights for m in group if w.endswith(f".{m}.weight")}
            for parent in sorted(parents):
                keys = [f"{parent}.{m}.weight" for m in group if f"{parent}.{m}.weight" in weights]
                if 0 < sum(k in q for k in keys) < len(keys):
                    out.append(f"vLLM fuses {', '.join(group)} into one layer and refuses mixed precision: "
                               f"under {parent} only some are quantized")
                    break
        return out

    @classmethod
    def recognizes(cls, file) -> bool:
        """quantkit's metadata, a compressed-tensors config.json beside the file, or ``[1]``-shaped
        ``.weight_scale`` tensors next to FP8 weights (native writes 0-dim per-tensor scales) and
        no ComfyUI markers."""
        if file.metadata.get("quantkit.format") == cls.name:
            return True
        if any(k == "scaled_fp8" or k.endswith((".comfy_quant", ".scale_weight")) for k in file.tensors):
            return False
        pairs = [(info, file.tensors[k[: -len(SCALE_SUFFIX)]]) for k, info in file.tensors.items()
                 if k.endswith(".weight" + SCALE_SUFFIX) and k[: -len(SCALE_SUFFIX)] in file.tensors]
        pairs = [(s, w) for s, w in pairs if fp8_of(w.dtype.code) is not None]
        if not pairs:
            return False
        if _config_says_compressed_tensors(file.path):
            return True
        return any(tuple(s.shape) == (1,) for s, _ in pairs)

    def card_library(self, source_card: dict) -> str | None:
        return source_card.get("library_name") or "transformers"

    def card_pipeline_tag(self, source_card: dict) -> str | None:
        return source_card.get("pipeline_tag")        # a model folder the hub's task runs on

    def how_to_load(self, target: str, prov: dict) -> str:
        scheme = ("W8A8 FP8 with static calibrated input scales" if prov["calibration"]["activations"]
                  else "weight-only FP8")
        body = ("transformers (with the `compressed-tensors` package) and vLLM read `config.json`'s "
                f"`quantization_config` ({scheme}):\n\n```python\nfrom transformers import AutoModel\n"
                "model = AutoModel.from_pretrained(\"PATH_OR_REPO\")   # FP8 at rest, decompressed at the first "
                "forward\n```\n")
        if any(f["name"] == "modules.json" for f in prov["files"]):
            body += ("\nsentence-transformers calls the model's forward directly: dequantize at load instead.\n\n"
                     "```python\nfrom sentence_transformers import SentenceTransformer\n"
                     "from transformers import CompressedTensorsConfig\nmodel = SentenceTransformer(\"PATH_OR_REPO\", "
                     "model_kwargs={\"quantization_config\": CompressedTensorsConfig(dequantize=True)})\n```\n")
        return body

    def runtime_snippet(self, target: str) -> tuple[str, str, str]:
        return ("import transformers\n",
                'transformers.AutoModel.from_config(transformers.AutoConfig.from_pretrained("PATH_OR_REPO"))',
                "PATH_OR_REPO")

    def stored(self, file) -> dict[str, StoredTensor]:
        # <L>.input_scale is read back as the weight's input_scale_key (base.stored_with_scales).
        def auxiliary(key: str) -> bool:      # input scales, zero points of an FP8 weight: not source tensors
            return key.endswith(AUX_SUFFIXES) and _is_fp8(file, key.rsplit(".", 1)[0] + ".weight")
        return stored_with_scales(file, SCALE_SUFFIX, granularity_from_shapes, skip=auxiliary, weights_only=True)


_LINEAR_ONLY = ("compressed-tensors loads FP8 weights into nn.Linear only "
                "(transformers would read the FP8 codes without their scale)")


def module_classes(source) -> dict[str, str] | None:
    """Module name -> class name of the transformers model the config beside ``source``'s weights
    describes, built on the meta device (no memory, no weights); None when transformers cannot
    build it (no transformers, an architecture it does not know, a config it refuses)."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    folder = source_folder(source)
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        with torch.device("meta"), quiet_transformers():
            model = cls(config) if cls is not None else transformers.AutoModel.from_config(config)
    except Exception:       # noqa: BLE001 -- any failure of a third-party build means: classes unknown
        return None
    classes = {name: type(m).__name__ for name, m in model.named_modules() if name}
    prefix = getattr(model, "base_model_prefix", "") or ""
    if prefix:      # weights saved from the bare model load into a head model, and the reverse
        classes.update({k[len(prefix) + 1:]: v for k, v in classes.items() if k.startswith(prefix + ".")})
    return classes


def _class_of(module: str, classes: dict[str, str]) -> str | None:
    return classes.get(module)


def _is_fp8(file, key: str) -> bool:
    info = file.tensors.get(key)
    return info is not None and fp8_of(info.dtype.code) is not None


def _config_says_compressed_tensors(path: str) -> bool:
    try:
        config = read_json(os.path.join(os.path.dirname(os.path.abspath(path)), CONFIG_NAME), 4 << 20)
        return config.get("quantization_config", {}).get("quant_method") == "compressed-tensors"
    except (OSError, JSONFileError, AttributeError):
        return False
