"""A diffusers FLUX.1 transformer under the key names ComfyUI loads (BFL's), as a view.

ComfyUI loads a FLUX.1 model under BFL's names. Handed a diffusers-named file, it renames the
keys itself (``model_detection.convert_diffusers_mmdit``), copying ``.weight``/``.bias`` only: FP8
scales and markers would be dropped (``formats/comfy.py`` refuses such files). So for the comfy
formats ``open_checkpoint(..., names="comfyui")`` presents a diffusers FLUX transformer under
BFL's names, and the file written is one ComfyUI loads natively::

    diffusers (N: transformer_blocks, M: single_transformer_blocks)  BFL / ComfyUI
    x_embedder, context_embedder                                     img_in, txt_in
    time_text_embed.{timestep,text,guidance}_embedder.linear_{1,2}   {time,vector,guidance}_in.{in,out}_layer
    N.norm1.linear, N.norm1_context.linear                           double_blocks.N.{img,txt}_mod.lin
    N.attn.to_q + to_k + to_v                                        double_blocks.N.img_attn.qkv
    N.attn.add_q_proj + add_k_proj + add_v_proj                      double_blocks.N.txt_attn.qkv
    N.attn.to_out.0, N.attn.to_add_out                               double_blocks.N.{img,txt}_attn.proj
    N.attn.norm_{q,k}.weight                                         double_blocks.N.img_attn.norm.{query,key}_norm.scale
    N.attn.norm_added_{q,k}.weight                                   double_blocks.N.txt_attn.norm.{query,key}_norm.scale
    N.ff.net.{0.proj,2}, N.ff_context.net.{0.proj,2}                 double_blocks.N.{img,txt}_mlp.{0,2}
    M.attn.to_q + to_k + to_v + M.proj_mlp                           single_blocks.M.linear1
    M.proj_out, M.norm.linear                                        single_blocks.M.linear2, .modulation.lin
    M.attn.norm_{q,k}.weight                                         single_blocks.M.norm.{query,key}_norm.scale
    proj_out                                                         final_layer.linear
    norm_out.linear  (rows: scale, shift)                            final_layer.adaLN_modulation.1 (shift, scale)

("A + B" concatenates rows.) Every renamed tensor is a list of row ranges of source tensors:
weights ``[out, in]`` and biases ``[out]`` are row-major, so concatenating rows concatenates
bytes, and the view streams them chunk by chunk like any other source. A fused weight gets one
scale over all its parts, which is what ComfyUI's one scale per layer needs. Any source key the
table does not name is an error (nothing is dropped silently).
"""
from __future__ import annotations

import re

from .errors import UnsupportedInputError
from .reader import TensorInfo, TensorSource

COMFYUI = "comfyui"
# A row range of a source tensor: (name, first row, end row).
Part = tuple[str, int, int]

_TOP = {
    "img_in": ["x_embedder"], "txt_in": ["context_embedder"],
    "time_in.in_layer": ["time_text_embed.timestep_embedder.linear_1"],
    "time_in.out_layer": ["time_text_embed.timestep_embedder.linear_2"],
    "vector_in.in_layer": ["time_text_embed.text_embedder.linear_1"],
    "vector_in.out_layer": ["time_text_embed.text_embedder.linear_2"],
    "guidance_in.in_layer": ["time_text_embed.guidance_embedder.linear_1"],
    "guidance_in.out_layer": ["time_text_embed.guidance_embedder.linear_2"],
}
_DOUBLE = {       # double_blocks.N.<key> <- transformer_blocks.N.<parts>, for .weight and .bias
    "img_mod.lin": ["norm1.linear"], "txt_mod.lin": ["norm1_context.linear"],
    "img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "img_attn.proj": ["attn.to_out.0"], "txt_attn.proj": ["attn.to_add_out"],
    "img_mlp.0": ["ff.net.0.proj"], "img_mlp.2": ["ff.net.2"],
    "txt_mlp.0": ["ff_context.net.0.proj"], "txt_mlp.2": ["ff_context.net.2"],
}
_DOUBLE_NORMS = {  # whole keys: RMSNorm scales
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight", "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
_SINGLE = {
    "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"], "linear2": ["proj_out"],
    "modulation.lin": ["norm.linear"],
}
_SINGLE_NORMS = {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}
_FINAL = {"final_layer.linear": ["proj_out"]}
_SWAPPED = ("final_layer.adaLN_modulation.1", "norm_out.linear")    # halves swapped


def is_diffusers_flux(names) -> bool:
    """A diffusers FluxTransformer2DModel state dict (not a ControlNet: ComfyUI loads those apart)."""
    names = set(names)
    return ("x_embedder.weight" in names and "transformer_blocks.0.attn.to_q.weight" in names
            and "single_transformer_blocks.0.proj_mlp.weight" in names
            and not any(n.startswith("controlnet_") for n in names))


def _blocks(names, prefix: str) -> list[int]:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for n in names if (m := pattern.match(n))})


def flux_to_bfl(tensors: dict[str, TensorInfo]) -> dict[str, list[Part]]:
    """BFL name -> the row ranges of diffusers tensors it is made of, in BFL's file order."""
    rows = {n: (i.shape[0] if i.shape else 1) for n, i in tensors.items()}
    out: dict[str, list[Part]] = {}

    def linear(new: str, parts: list[str]) -> None:
        for suffix in (".weight", ".bias"):
            found = [p + suffix in rows for p in parts]
            if any(found) and not all(found):
                missing = next(p + suffix for p, f in zip(parts, found) if not f)
                raise UnsupportedInputError(f"a diffusers FLUX tensor is missing: {missing}", tensor=missing,
                                            hint="the checkpoint is incomplete; re-export it")
            if all(found):
                out[new + suffix] = [(p + suffix, 0, rows[p + suffix]) for p in parts]

    for new, parts in _TOP.items():
        linear(new, parts)
    for src, dst, linears, norms in (("transformer_blocks", "double_blocks", _DOUBLE, _DOUBLE_NORMS),
                                     ("single_transformer_blocks", "single_blocks", _SINGLE, _SINGLE_NORMS)):
        for n in _blocks(rows, src + "."):
            old_block, new_block = f"{src}.{n}.", f"{dst}.{n}."
            for new, parts in linears.items():
                linear(new_block + new, [old_block + p for p in parts])
            for new, old in norms.items():
                if old_block + old in rows:
                    out[new_block + new] = [(old_block + old, 0, rows[old_block + old])]
    for new, parts in _FINAL.items():
        linear(new, parts)
    new, old = _SWAPPED
    for suffix in (".weight", ".bias"):
        if old + suffix in rows:
            r = rows[old + suffix]
            if r % 2:
                raise UnsupportedInputError(f"{r} rows cannot hold scale and shift halves", tensor=old + suffix,
                                            hint="this is not a FLUX.1 transformer")
            out[new + suffix] = [(old + suffix, r // 2, r), (old + suffix, 0, r // 2)]

    used = {p[0] for parts in out.values() for p in parts}
    unnamed = [n for n in rows if n not in used]
    if unnamed:
        more = f" and {len(unnamed) - 3} more" if len(unnamed) > 3 else ""
        raise UnsupportedInputError(f"no ComfyUI (BFL) name for {', '.join(unnamed[:3])}{more} of this diffusers "
                                    "FLUX transformer", tensor=unnamed[0],
                                    hint="write --format native (diffusers names), or convert the BFL release")
    return out


class _Concatenated(TensorSource):
    """Reads each renamed tensor from its row ranges of ``source``, in order."""

    def __init__(self, source: TensorSource, table: dict[str, list[Part]]):
        self.path = source.path
        self.metadata = {}
        self._source = source
        self._parts: dict[str, list[tuple[TensorInfo, int, int]]] = {}   # name -> (info, first byte, end byte)
        self.tensors: dict[str, TensorInfo] = {}
        for name, parts in table.items():
            infos = [source.tensors[p[0]] for p in parts]
            first = infos[0]
            if any(i.dtype is not first.dtype or i.shape[1:] != first.shape[1:] for i in infos):
                shapes = ", ".join(f"{i.name} {i.dtype.code} {list(i.shape)}" for i in infos)
                raise UnsupportedInputError(f"cannot join {shapes} into {name}: dtypes or widths differ",
                                            path=source.path, tensor=name, hint="the checkpoint is inconsistent")
            spans, nbytes, total_rows = [], 0, 0
            for info, (_, r0, r1) in zip(infos, parts):
                row_bytes = info.nbytes // (info.shape[0] if info.shape else 1)
                spans.append((info, r0 * row_bytes, r1 * row_bytes))
                nbytes, total_rows = nbytes + (r1 - r0) * row_bytes, total_rows + (r1 - r0)
            shape = (total_rows, *first.shape[1:]) if first.shape else ()
            self._parts[name] = spans
            self.tensors[name] = TensorInfo(name, first.dtype, shape, 0, nbytes)

    def read_into(self, info: TensorInfo, byte_offset: int, out) -> None:
        view = memoryview(out).cast("B")
        pos, done = byte_offset, 0            # pos: offset in the joined tensor
        base = 0                              # where the current part starts in it
        for part, b0, b1 in self._parts[info.name]:
            size = b1 - b0
            if done < len(view) and pos < base + size:
                n = min(base + size - pos, len(view) - done)
                self._source.read_into(part, b0 + pos - base, view[done:done + n])
                pos, done = pos + n, done + n
            base += size
        if done != len(view):
            raise ValueError(f"{info.name}: read past the end of the tensor")

    def source_names(self, name: str) -> list[str]:
        return [p.name for p, _, _ in self._parts[name]]


def comfyui_view(checkpoint):
    """``checkpoint`` under ComfyUI's names when it is a diffusers FLUX transformer, else itself."""
    from .checkpoint import Checkpoint
    if not is_diffusers_flux(checkpoint.tensors):
        return checkpoint
    try:
        table = flux_to_bfl(checkpoint.tensors)
        joined = _Concatenated(checkpoint, table)
    except UnsupportedInputError as exc:
        exc.path = exc.path or checkpoint.path
        raise
    fused = sum(len(parts) > 1 for parts in table.values())
    note = (f"diffusers FLUX names written as ComfyUI's (BFL): {len(checkpoint.tensors)} tensors -> {len(table)}, "
            f"{fused} of them joined (q/k/v, single-block linear1) or reordered (final_layer.adaLN_modulation.1)")
    notes = [*checkpoint.notes, note]
    view = Checkpoint(checkpoint.path, checkpoint.layout, checkpoint.files,
                      {n: (joined, i) for n, i in joined.tensors.items()}, metadata=checkpoint.metadata,
                      notes=notes, readers=[checkpoint], real_offsets=False)
    view.renamed = COMFYUI
    return view
