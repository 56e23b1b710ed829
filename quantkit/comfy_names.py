"""A diffusers FLUX.1 / SD3 transformer or UNet under the key names ComfyUI loads (BFL's / SAI's / LDM's).

ComfyUI loads these models under the original releases' names. Handed a diffusers-named file, it
renames the keys itself (``model_detection.convert_diffusers_mmdit``, ``utils.unet_to_diffusers``)
through maps that carry ``.weight`` / ``.bias`` only: FP8 scales and markers would be dropped
(``formats/comfy.py`` refuses such files). So for the comfy formats ``sources.open_source(...,
names="comfyui")`` presents a diffusers FLUX.1 or SD3 transformer or SD1.x/SD2.x/SDXL UNet under
the original names, and the file written is one ComfyUI loads natively. This module holds the
shared machinery (``Table``, ``RenamedView``) and those three tables; ``comfy_names_video`` and
``comfy_names_image`` hold the other families' (Wan, HunyuanVideo 1.0 / 1.5, LTX-Video, Mochi,
Cosmos 1.0 / Predict2; Lumina 2, Z-Image, Chroma, FLUX.2, AuraFlow, PixArt, HunyuanDiT), and
``sources.COMFYUI_VIEWS`` tries them all.

FLUX.1 (N: transformer_blocks, M: single_transformer_blocks)::

    diffusers                                                        BFL / ComfyUI
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

SD3 / SD3.5 (N: transformer_blocks; the last one is context_pre_only)::

    diffusers                                                        SAI / ComfyUI
    pos_embed.pos_embed, pos_embed.proj, context_embedder            pos_embed, x_embedder.proj, context_embedder
    time_text_embed.{timestep,text}_embedder.linear_{1,2}            {t,y}_embedder.mlp.{0,2}
    N.norm1.linear, N.norm1_context.linear                           joint_blocks.N.{x,context}_block.adaLN_modulation.1
                                                                     (the last block's context one: halves swapped)
    N.attn.to_q + to_k + to_v, N.attn.to_out.0                       joint_blocks.N.x_block.attn.{qkv,proj}
    N.attn2.to_q + to_k + to_v, N.attn2.to_out.0                     joint_blocks.N.x_block.attn2.{qkv,proj}
    N.attn.add_q_proj + add_k_proj + add_v_proj, N.attn.to_add_out   joint_blocks.N.context_block.attn.{qkv,proj}
    N.attn{,2}.norm_{q,k}, N.attn.norm_added_{q,k} (.weight)         ...x_block.attn{,2}.ln_{q,k}, ...context_block.attn.ln_{q,k}
    N.ff.net.{0.proj,2}, N.ff_context.net.{0.proj,2}                 joint_blocks.N.{x,context}_block.mlp.fc{1,2}
    proj_out, norm_out.linear (halves swapped)                       final_layer.linear, final_layer.adaLN_modulation.1

UNet (renames only; L resnets per down level, L+1 per up level, as ``unet_to_ldm`` says)::

    time_embedding.linear_{1,2}, add_embedding.linear_{1,2}          time_embed.{0,2}, label_emb.0.{0,2}
    conv_in, conv_norm_out, conv_out                                 input_blocks.0.0, out.0, out.2
    down_blocks.i.resnets.j / .attentions.j                          input_blocks.{i(L+1)+j+1}.0 / .1
    down_blocks.i.downsamplers.0.conv                                input_blocks.{(i+1)(L+1)}.0.op
    mid_block.resnets.0, .attentions.0, .resnets.1                   middle_block.0, .1, .2
    up_blocks.i.resnets.j / .attentions.j                            output_blocks.{i(L+1)+j}.0 / .1
    up_blocks.i.upsamplers.0.conv                                    output_blocks.{i(L+1)+L}.{1, or 2 after attention}.conv
    resnet norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut  in_layers.0, in_layers.2, emb_layers.1,
                                                                     out_layers.0, out_layers.3, skip_connection

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


class Table:
    """Builds new name -> parts over the source's row counts; ``done`` refuses a source key left unused."""

    def __init__(self, tensors: dict[str, TensorInfo], what: str):
        self.rows = {n: (i.shape[0] if i.shape else 1) for n, i in tensors.items()}
        self.what = what
        self.out: dict[str, list[Part]] = {}

    def blocks(self, prefix: str) -> list[int]:
        pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
        return sorted({int(m.group(1)) for n in self.rows if (m := pattern.match(n))})

    def linear(self, new: str, parts: list[str], *, swapped: bool = False) -> None:
        """``new``.weight / .bias <- the rows of ``parts`` (.weight / .bias) in order, when present;
        ``swapped``: one part whose two halves change places (scale, shift -> shift, scale)."""
        for suffix in (".weight", ".bias"):
            found = [p + suffix in self.rows for p in parts]
            if any(found) and not all(found):
                missing = next(p + suffix for p, f in zip(parts, found) if not f)
                raise UnsupportedInputError(f"a diffusers {self.what} tensor is missing: {missing}", tensor=missing,
                                            hint="the checkpoint is incomplete; re-export it")
            if all(found):
                self.out[new + suffix] = [(p + suffix, 0, self.rows[p + suffix]) for p in parts]
                if swapped:
                    (old, _, r), = self.out[new + suffix]
                    if r % 2:
                        raise UnsupportedInputError(f"{r} rows cannot hold scale and shift halves", tensor=old,
                                                    hint=f"this is not a {self.what} transformer")
                    self.out[new + suffix] = [(old, r // 2, r), (old, 0, r // 2)]

    def stack(self, src: str, dst: str, linears: dict[str, list[str]], keys: dict[str, str] | None = None) -> None:
        """Every block ``src.N.`` as ``dst.N.``: each of ``linears`` (new name under the block -> the parts
        it is made of under the old block) and each of ``keys`` (new name -> the whole tensor renamed)."""
        for n in self.blocks(src + "."):
            old, new = f"{src}.{n}.", f"{dst}.{n}."
            for name, parts in linears.items():
                self.linear(new + name, [old + p for p in parts])
            for name, key in (keys or {}).items():
                self.key(new + name, old + key)

    def key(self, new: str, old: str) -> None:
        """A whole tensor renamed, when present."""
        if old in self.rows:
            self.out[new] = [(old, 0, self.rows[old])]

    def done(self, names: str) -> dict[str, list[Part]]:
        used = {p[0] for parts in self.out.values() for p in parts}
        unnamed = [n for n in self.rows if n not in used]
        if unnamed:
            more = f" and {len(unnamed) - 3} more" if len(unnamed) > 3 else ""
            raise UnsupportedInputError(f"no ComfyUI ({names}) name for {', '.join(unnamed[:3])}{more} of this "
                                        f"diffusers {self.what} transformer", tensor=unnamed[0],
                                        hint=f"write --format native (diffusers names), or convert the {names} release")
        return self.out


# ----------------------------------------------------------------------------- FLUX.1 -> BFL

_FLUX_TOP = {
    "img_in": ["x_embedder"], "txt_in": ["context_embedder"],
    "time_in.in_layer": ["time_text_embed.timestep_embedder.linear_1"],
    "time_in.out_layer": ["time_text_embed.timestep_embedder.linear_2"],
    "vector_in.in_layer": ["time_text_embed.text_embedder.linear_1"],
    "vector_in.out_layer": ["time_text_embed.text_embedder.linear_2"],
    "guidance_in.in_layer": ["time_text_embed.guidance_embedder.linear_1"],
    "guidance_in.out_layer": ["time_text_embed.guidance_embedder.linear_2"],
}
FLUX_DOUBLE = {       # double_blocks.N.<key> <- transformer_blocks.N.<parts>, for .weight and .bias
    "img_mod.lin": ["norm1.linear"], "txt_mod.lin": ["norm1_context.linear"],
    "img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "img_attn.proj": ["attn.to_out.0"], "txt_attn.proj": ["attn.to_add_out"],
    "img_mlp.0": ["ff.net.0.proj"], "img_mlp.2": ["ff.net.2"],
    "txt_mlp.0": ["ff_context.net.0.proj"], "txt_mlp.2": ["ff_context.net.2"],
}
_FLUX_DOUBLE_NORMS = {  # whole keys: RMSNorm scales
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight", "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
FLUX_SINGLE = {
    "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"], "linear2": ["proj_out"],
    "modulation.lin": ["norm.linear"],
}
_FLUX_SINGLE_NORMS = {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}


def is_diffusers_flux(names) -> bool:
    """A diffusers FluxTransformer2DModel state dict (not a ControlNet: ComfyUI loads those apart; not Chroma)."""
    names = set(names)
    return ("x_embedder.weight" in names and "transformer_blocks.0.attn.to_q.weight" in names
            and "single_transformer_blocks.0.proj_mlp.weight" in names
            and not any(n.startswith(("controlnet_", "distilled_guidance_layer.")) for n in names))   # nor Chroma


def flux_to_bfl(tensors: dict[str, TensorInfo]) -> dict[str, list[Part]]:
    """BFL name -> the row ranges of diffusers tensors it is made of, in BFL's file order."""
    t = Table(tensors, "FLUX.1")
    for new, parts in _FLUX_TOP.items():
        t.linear(new, parts)
    t.stack("transformer_blocks", "double_blocks", FLUX_DOUBLE, _FLUX_DOUBLE_NORMS)
    t.stack("single_transformer_blocks", "single_blocks", FLUX_SINGLE, _FLUX_SINGLE_NORMS)
    t.linear("final_layer.linear", ["proj_out"])
    t.linear("final_layer.adaLN_modulation.1", ["norm_out.linear"], swapped=True)
    return t.done("BFL")


# ----------------------------------------------------------------------------- SD3 / SD3.5 -> SAI

_SD3_TOP = {
    "x_embedder.proj": ["pos_embed.proj"], "context_embedder": ["context_embedder"],
    "t_embedder.mlp.0": ["time_text_embed.timestep_embedder.linear_1"],
    "t_embedder.mlp.2": ["time_text_embed.timestep_embedder.linear_2"],
    "y_embedder.mlp.0": ["time_text_embed.text_embedder.linear_1"],
    "y_embedder.mlp.2": ["time_text_embed.text_embedder.linear_2"],
}
_SD3_BLOCK = {         # joint_blocks.N.<key> <- transformer_blocks.N.<parts>, for .weight and .bias
    "x_block.adaLN_modulation.1": ["norm1.linear"],
    "x_block.attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"], "x_block.attn.proj": ["attn.to_out.0"],
    "x_block.attn2.qkv": ["attn2.to_q", "attn2.to_k", "attn2.to_v"], "x_block.attn2.proj": ["attn2.to_out.0"],
    "x_block.mlp.fc1": ["ff.net.0.proj"], "x_block.mlp.fc2": ["ff.net.2"],
    "context_block.attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "context_block.attn.proj": ["attn.to_add_out"],
    "context_block.mlp.fc1": ["ff_context.net.0.proj"], "context_block.mlp.fc2": ["ff_context.net.2"],
}
_SD3_BLOCK_NORMS = {
    "x_block.attn.ln_q.weight": "attn.norm_q.weight", "x_block.attn.ln_k.weight": "attn.norm_k.weight",
    "x_block.attn2.ln_q.weight": "attn2.norm_q.weight", "x_block.attn2.ln_k.weight": "attn2.norm_k.weight",
    "context_block.attn.ln_q.weight": "attn.norm_added_q.weight",
    "context_block.attn.ln_k.weight": "attn.norm_added_k.weight",
}


def is_diffusers_sd3(names) -> bool:
    """A diffusers SD3Transformer2DModel state dict (not an SD3 ControlNet)."""
    names = set(names)
    return ("pos_embed.proj.weight" in names and "transformer_blocks.0.attn.add_q_proj.weight" in names
            and "time_text_embed.text_embedder.linear_1.weight" in names
            and not any(n.startswith(("controlnet_", "pos_embed_input.")) for n in names))


def sd3_to_sai(tensors: dict[str, TensorInfo]) -> dict[str, list[Part]]:
    """SAI (ComfyUI MMDiT) name -> the row ranges of diffusers tensors it is made of. The last block
    is context_pre_only: its context modulation is a scale/shift pair, stored swapped as the final layer's."""
    t = Table(tensors, "SD3")
    t.key("pos_embed", "pos_embed.pos_embed")
    for new, parts in _SD3_TOP.items():
        t.linear(new, parts)
    blocks = t.blocks("transformer_blocks.")
    for n in blocks:
        old, new = f"transformer_blocks.{n}.", f"joint_blocks.{n}."
        for name, parts in _SD3_BLOCK.items():
            t.linear(new + name, [old + p for p in parts])
        t.linear(new + "context_block.adaLN_modulation.1", [old + "norm1_context.linear"], swapped=n == blocks[-1])
        for name, key in _SD3_BLOCK_NORMS.items():
            t.key(new + name, old + key)
    t.linear("final_layer.linear", ["proj_out"])
    t.linear("final_layer.adaLN_modulation.1", ["norm_out.linear"], swapped=True)
    return t.done("SAI")


# ----------------------------------------------------------------------------- SD1.x / SD2.x / SDXL UNet -> LDM

_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def is_diffusers_unet(names) -> bool:
    """A diffusers UNet2DConditionModel state dict (not a ControlNet)."""
    names = set(names)
    return ("conv_in.weight" in names and "time_embedding.linear_1.weight" in names
            and "down_blocks.0.resnets.0.conv1.weight" in names
            and not any(n.startswith("controlnet_") for n in names))


def unet_to_ldm(tensors: dict[str, TensorInfo]) -> dict[str, list[Part]]:
    """LDM (ComfyUI) name -> the diffusers tensor it renames. Level i of L resnets fills LDM's
    input_blocks i*(L+1)+1 ... i*(L+1)+L (its downsampler the next one), and up level i (L+1
    resnets) output_blocks i*(L+1) ... i*(L+1)+L, its upsampler after the resnet (and attention)."""
    t = Table(tensors, "UNet")
    names = list(t.rows)

    def subtree(old: str, new: str, renames: dict[str, str] | None = None) -> None:
        for k in names:
            if k.startswith(old):
                rest = k[len(old):]
                head, dot, tail = rest.partition(".")
                t.key(new + (renames or {}).get(head, head) + dot + tail, k)

    for old, new in _UNET_TOP.items():
        subtree(old + ".", new + ".")
    per_level = len(t.blocks("down_blocks.0.resnets.")) + 1
    for i in t.blocks("down_blocks."):
        for j in t.blocks(f"down_blocks.{i}.resnets."):
            subtree(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{i * per_level + j + 1}.0.", _RESNET)
        for j in t.blocks(f"down_blocks.{i}.attentions."):
            subtree(f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{i * per_level + j + 1}.1.")
        subtree(f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * per_level}.0.op.")
    subtree("mid_block.resnets.0.", "middle_block.0.", _RESNET)
    subtree("mid_block.attentions.0.", "middle_block.1.")
    subtree("mid_block.resnets.1.", "middle_block.2.", _RESNET)
    for i in t.blocks("up_blocks."):
        attentions = t.blocks(f"up_blocks.{i}.attentions.")
        for j in t.blocks(f"up_blocks.{i}.resnets."):
            subtree(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{i * per_level + j}.0.", _RESNET)
        for j in attentions:
            subtree(f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{i * per_level + j}.1.")
        subtree(f"up_blocks.{i}.upsamplers.0.conv.",
                f"output_blocks.{i * per_level + per_level - 1}.{2 if attentions else 1}.conv.")
    return t.done("LDM")


# Diffusers models ComfyUI would rename on load, and what quantkit names them instead: (family,
# whose names, detect(names), build(tensors) -> table). ``sources`` adds the other families' views.
VIEWS = (("FLUX.1", "BFL", is_diffusers_flux, flux_to_bfl), ("SD3", "SAI", is_diffusers_sd3, sd3_to_sai),
          ("UNet", "LDM", is_diffusers_unet, unet_to_ldm))


class _Concatenated(TensorSource):
    """Reads each renamed tensor from its row ranges of ``source``, in order."""

    def __init__(self, source: TensorSource, table: dict[str, list[Part]]):
        self.path = source.path
        self.metadata = {}
        self._source = source
        self._parts: dict[str, list[tuple[TensorInfo, int, int]]] = {}   # name -> (info, first byte, end byte)
        self.tensors: dict[str, TensorInfo] = {}
        offset = 0
        for name, parts in table.items():
            infos = [source.tensors[p[0]] for p in parts]
            first = infos[0]
            if any(i.dtype is not first.dtype or i.shape[1:] != first.shape[1:] for i in infos):
                shapes = ", ".join(f"{i.name} {i.dtype.code} {list(i.shape)}" for i in infos)
                raise UnsupportedInputError(f"cannot join {shapes} into {name}: dtypes or widths differ",
                                            path=source.path, tensor=name, hint="the checkpoint is inconsistent")
            spans, nbytes, total_rows = [], 0, 0
            for info, (_, r0, r1) in zip(infos, parts):
                rows = info.shape[0] if info.shape else 1
                row_bytes = info.nbytes // rows if rows else 0
                spans.append((info, r0 * row_bytes, r1 * row_bytes))
                nbytes, total_rows = nbytes + (r1 - r0) * row_bytes, total_rows + (r1 - r0)
            shape = (total_rows, *first.shape[1:]) if first.shape else ()
            self._parts[name] = spans
            # offsets into a virtual concatenation of the renamed tensors (only nbytes is meaningful)
            self.tensors[name] = TensorInfo(name, first.dtype, shape, offset, offset + nbytes)
            offset += nbytes

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


class RenamedView(TensorSource):
    """A checkpoint under other names: each tensor read from row ranges of ``original``'s
    (``parts``: name -> its (source name, first row, end row) list). It stands for the checkpoint
    everywhere (its files, layout and size are the original's); ``renamed`` says under whose names."""

    def __init__(self, original, parts: dict[str, list[Part]], renamed: str, note: str):
        self.original, self.parts, self.renamed = original, parts, renamed
        self.path, self.layout, self.files = original.path, original.layout, original.files
        self.file_size, self.metadata = original.file_size, original.metadata
        self.notes = [*original.notes, note]
        self._joined = _Concatenated(original, parts)
        self.tensors = self._joined.tensors

    def read_into(self, info: TensorInfo, byte_offset: int, out) -> None:
        self._joined.read_into(info, byte_offset, out)

    def source_of(self, name: str) -> str:
        """The file that holds tensor ``name`` (its first part's)."""
        return self.original.source_of(self.parts[name][0][0])

    def close(self) -> None:
        self.original.close()

    def __repr__(self) -> str:
        return f"RenamedView({self.original!r}, as {self.renamed})"


def comfyui_view(checkpoint, views=VIEWS):
    """``checkpoint`` under ComfyUI's names when one of ``views`` detects it (a diffusers FLUX.1 / SD3
    transformer or UNet by default), else itself."""
    found = next((v for v in views if v[2](checkpoint.tensors)), None)
    if found is None:
        return checkpoint
    what, names, _, build = found
    try:
        table = build(checkpoint.tensors)
        fused = sum(len(parts) > 1 for parts in table.values())
        note = (f"diffusers {what} names written as ComfyUI's ({names}): {len(checkpoint.tensors)} tensors -> "
                f"{len(table)}, {fused} of them joined (q/k/v) or reordered (modulation scale/shift halves)")
        return RenamedView(checkpoint, table, COMFYUI, note)
    except UnsupportedInputError as exc:
        exc.path = exc.path or checkpoint.path
        raise


def joined(source: TensorSource) -> dict[str, list[str]]:
    """Name -> the source rows it joins, for each tensor of a ``RenamedView`` made of two or more
    parts ({} for any other source)."""
    if not isinstance(source, RenamedView):
        return {}
    return {name: [_describe(p, source.original.tensors[p[0]]) for p in parts]
            for name, parts in source.parts.items() if len(parts) > 1}


def to_source_names(state: dict, view: RenamedView) -> dict:
    """The view undone on whole tensors: ``state`` under the view's names -> under the source's
    (joined rows split back, swapped halves swapped back). For ``validate --model-output``."""
    import torch
    source = view.original.tensors
    out: dict = {}
    for name, parts in view.parts.items():
        if name not in state:       # missing from the output: the model load names what is missing
            continue
        t, row = state[name], 0
        for src, r0, r1 in parts:
            info = source[src]
            if not info.shape:
                out[src] = t.reshape(())
                continue
            if src not in out:
                out[src] = torch.empty(info.shape, dtype=t.dtype)
            out[src][r0:r1] = t[row:row + r1 - r0]
            row += r1 - r0
    return out


def _describe(part: Part, info: TensorInfo) -> str:
    """``name``, or ``name[r0:r1]`` for some of its rows."""
    name, r0, r1 = part
    return name if (r0, r1) == (0, info.shape[0] if info.shape else 1) else f"{name}[{r0}:{r1}]"
