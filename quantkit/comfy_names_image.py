"""Diffusers image transformers under the key names ComfyUI loads (the original releases').

As ``comfy_names_video`` does for the video families: for the comfy formats
``sources.open_source(..., names="comfyui")`` renames these (``comfy_names.Table``; any source key
the table does not name is refused). The reference for each table is diffusers' own converter from
the original names, which runs the other way (``diffusers.loaders.single_file_utils.convert_
lumina2_to_diffusers``, ``convert_z_image_transformer_checkpoint_to_diffusers``), and ComfyUI's
``comfy/ldm/lumina/model.py``.

Lumina 2 (B: noise_refiner.N, context_refiner.N, layers.N)::

    diffusers                                              Lumina 2 / ComfyUI
    time_caption_embed.timestep_embedder.linear_{1,2}      t_embedder.mlp.{0,2}
    time_caption_embed.caption_embedder.{0,1}              cap_embedder.{0,1}
    B.attn.to_q + to_k + to_v, B.attn.to_out.0             B.attention.qkv, B.attention.out
    B.attn.norm_{q,k}                                      B.attention.{q,k}_norm
    B.feed_forward.linear_{1,2,3}                          B.feed_forward.w{1,2,3}
    B.norm1.norm (context_refiner: B.norm1), B.norm2       B.attention_norm1, B.attention_norm2
    B.norm1.linear                                         B.adaLN_modulation.1
    norm_out.linear_1, norm_out.linear_2                   final_layer.adaLN_modulation.1, final_layer.linear

Z-Image (patch size 2-1, as ComfyUI's ``z_image_to_diffusers``; every other key keeps its name)::

    all_x_embedder.2-1, all_final_layer.2-1.*              x_embedder, final_layer.*
    B.attention.to_q + to_k + to_v, B.attention.to_out.0   B.attention.qkv, B.attention.out
    B.attention.norm_{q,k}                                 B.attention.{q,k}_norm

Chroma (FLUX.1's blocks as ``comfy_names`` joins them, without per-block modulation: the
approximator makes it; RMSNorm scales under ComfyUI's module names, ``.weight``)::

    x_embedder, context_embedder                           img_in, txt_in
    distilled_guidance_layer.layers.N.linear_{1,2}         distilled_guidance_layer.layers.N.{in,out}_layer
    distilled_guidance_layer.{in_proj,out_proj,norms.N}    (unchanged)
    transformer_blocks.N, single_transformer_blocks.N      double_blocks.N, single_blocks.N (q/k norms:
                                                           ...norm.{query,key}_norm.weight)
    proj_out                                               final_layer.linear

FLUX.2 (fused single-block projections already, as BFL's; the modulation is global)::

    x_embedder, context_embedder                           img_in, txt_in
    time_guidance_embed.{timestep,guidance}_embedder.linear_{1,2}
                                                           {time,guidance}_in.{in,out}_layer
    double_stream_modulation_{img,txt}.linear, single_stream_modulation.linear
                                                           (the same).lin
    N.attn.to_q + to_k + to_v, N.attn.add_{q,k,v}_proj     double_blocks.N.{img,txt}_attn.qkv
    N.attn.to_out.0, N.attn.to_add_out                     double_blocks.N.{img,txt}_attn.proj
    N.attn.norm_{q,k}, N.attn.norm_added_{q,k}             double_blocks.N.{img,txt}_attn.norm.{query,key}_norm
    N.ff.linear_{in,out}, N.ff_context.linear_{in,out}     double_blocks.N.{img,txt}_mlp.{0,2}
    M.attn.to_qkv_mlp_proj, M.attn.to_out, M.attn.norm_{q,k}
                                                           single_blocks.M.linear1, linear2, norm.{query,key}_norm
    proj_out, norm_out.linear (halves swapped)             final_layer.linear, final_layer.adaLN_modulation.1

AuraFlow (renames only but the final modulation; ComfyUI renames a diffusers AuraFlow on load
through a map that drops FP8 scales, so it is written under the original names)::

    pos_embed.pos_embed, pos_embed.proj, register_tokens   positional_encoding, init_x_linear, register_tokens
    time_step_proj.linear_{1,2}, context_embedder          t_embedder.mlp.{0,2}, cond_seq_linear
    joint_transformer_blocks.N.attn.to_{q,k,v}, to_out.0   double_layers.N.attn.w2{q,k,v,o}
    joint_transformer_blocks.N.attn.add_{q,k,v}_proj, to_add_out
                                                           double_layers.N.attn.w1{q,k,v,o}
    joint_transformer_blocks.N.ff{,_context}.{linear_1,linear_2,out_projection}
                                                           double_layers.N.mlp{X,C}.{c_fc1,c_fc2,c_proj}
    joint_transformer_blocks.N.norm1{,_context}.linear     double_layers.N.mod{X,C}.1
    single_transformer_blocks.N.attn.to_{q,k,v}, to_out.0, ff.*, norm1.linear
                                                           single_layers.N.attn.w1{q,k,v,o}, mlp.*, modCX.1
    proj_out, norm_out.linear (halves swapped)             final_linear, modF.1

PixArt-alpha / Sigma (ComfyUI renames a diffusers PixArt on load, dropping FP8 scales; the map is
ComfyUI's own ``comfy.utils.pixart_to_diffusers`` inverted; diffusers has no single-file converter)::

    pos_embed.proj, caption_projection.linear_{1,2}        x_embedder.proj, y_embedder.y_proj.fc{1,2}
    adaln_single.emb.timestep_embedder.linear_{1,2}        t_embedder.mlp.{0,2}
    adaln_single.emb.{resolution,aspect_ratio}_embedder.linear_{1,2}
                                                           {csize,ar}_embedder.mlp.{0,2}
    adaln_single.linear, proj_out, scale_shift_table       t_block.1, final_layer.linear, final_layer.scale_shift_table
    N.attn1.to_q + to_k + to_v, N.attn1.to_out.0           blocks.N.attn.qkv, blocks.N.attn.proj
    N.attn2.to_q, N.attn2.to_k + to_v, N.attn2.to_out.0    blocks.N.cross_attn.{q_linear,kv_linear,proj}
    N.ff.net.{0.proj,2}, N.scale_shift_table               blocks.N.mlp.fc{1,2}, blocks.N.scale_shift_table

HunyuanDiT 1.x (diffusers' own conversion script inverted; Tencent's norm3 is the cross-attention's)::

    diffusers                                              Tencent / ComfyUI
    pos_embed.proj, text_embedder.linear_{1,2}, proj_out   x_embedder.proj, mlp_t5.{0,2}, final_layer.linear
    time_extra_emb.timestep_embedder.linear_{1,2}          t_embedder.mlp.{0,2}
    time_extra_emb.{pooler.*, extra_embedder.linear_{1,2}, style_embedder}
                                                           pooler.*, extra_embedder.{0,2}, style_embedder
    N.norm1.norm, N.norm1.linear, N.norm2, N.norm3         blocks.N.norm1, default_modulation.1, norm3, norm2
    N.attn1.to_q + to_k + to_v, to_out.0, norm_{q,k}       blocks.N.attn1.Wqkv, out_proj, {q,k}_norm
    N.attn2.to_q, to_k + to_v, to_out.0, norm_{q,k}        blocks.N.attn2.q_proj, kv_proj, out_proj, {q,k}_norm
    N.ff.net.{0.proj,2}, N.skip_{norm,linear}              blocks.N.mlp.fc{1,2}, skip_{norm,linear}
    norm_out.linear (halves swapped)                       final_layer.adaLN_modulation.1

Stable Cascade (stages C and B; renames only): ``N.attention.to_{q,k,v}``, ``to_out.0`` are ComfyUI's
``N.attention.attn.to_{q,k,v}``, ``attn.out_proj``; every other key keeps its name.
"""
from __future__ import annotations

import re

from .comfy_names import FLUX_DOUBLE, FLUX_SINGLE, Part, Table
from .reader import TensorInfo

_REFINED = ("noise_refiner", "context_refiner", "layers")

# ----------------------------------------------------------------------------- Lumina 2

_LUMINA_TOP = {
    "x_embedder": ["x_embedder"],
    "t_embedder.mlp.0": ["time_caption_embed.timestep_embedder.linear_1"],
    "t_embedder.mlp.2": ["time_caption_embed.timestep_embedder.linear_2"],
    "cap_embedder.0": ["time_caption_embed.caption_embedder.0"],
    "cap_embedder.1": ["time_caption_embed.caption_embedder.1"],
    "final_layer.adaLN_modulation.1": ["norm_out.linear_1"], "final_layer.linear": ["norm_out.linear_2"],
}
_LUMINA_BLOCK = {      # <block>.N.<key> <- <block>.N.<parts>, for .weight and .bias
    "attention.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"], "attention.out": ["attn.to_out.0"],
    "attention.q_norm": ["attn.norm_q"], "attention.k_norm": ["attn.norm_k"],
    "feed_forward.w1": ["feed_forward.linear_1"], "feed_forward.w2": ["feed_forward.linear_2"],
    "feed_forward.w3": ["feed_forward.linear_3"],
    "attention_norm2": ["norm2"], "ffn_norm1": ["ffn_norm1"], "ffn_norm2": ["ffn_norm2"],
    "adaLN_modulation.1": ["norm1.linear"],
}


def is_diffusers_lumina2(names) -> bool:
    """A diffusers Lumina2Transformer2DModel state dict (not OmniGen2's, whose own names look alike and which
    ComfyUI reads as they are: it has a ref_image_patch_embedder)."""
    names = set(names)
    return ("time_caption_embed.timestep_embedder.linear_1.weight" in names and "layers.0.attn.to_q.weight" in names
            and "norm_out.linear_2.weight" in names and "ref_image_patch_embedder.weight" not in names)


def lumina2_to_comfy(tensors: dict[str, TensorInfo]) -> dict[str, list[Part]]:
    """Lumina 2 (ComfyUI) name -> the row ranges of diffusers tensors it is made of. The modulated
    blocks' first norm is norm1.norm, the context refiner's (unmodulated) norm1."""
    t = Table(tensors, "Lumina 2")
    for new, parts in _LUMINA_TOP.items():
        t.linear(new, parts)
    for blocks in _REFINED:
        for n in t.blocks(blocks + "."):
            old = f"{blocks}.{n}."
            for name, parts in _LUMINA_BLOCK.items():
                t.linear(old + name, [old + p for p in parts])
            t.linear(old + "attention_norm1", [old + "norm1.norm"])
            t.linear(old + "attention_norm1", [old + "norm1"])
    return t.done("Lumina 2")


# ----------------------------------------------------------------------------- Z-Image

_Z_IMAGE_ATTENTION = {"attention.qkv": ["attention.to_q", "attention.to_k", "attention.to_v"],
                      "attention.out": ["attention.to_out.0"], "attention.q_norm": ["attention.norm_q"],
                      "attention.k_norm": ["attention.norm_k"]}
_Z_IMAGE_PATCH = re.compile(r"all_(x_embedder|final_layer)\.(\d+-\d+)\.")


def is_diffusers_z_image(names) -> bool:
    """A diffusers ZImageTransformer2DModel state dict."""
    names = set(names)
    return "layers.0.attention.to_q.weight" in names and any(n.startswith("all_x_embedder.") for n in names)


def z_image_to_comfy(tensors: dict[str, TensorInfo]) -> dict[str, list[Part]]:
    """Z-Image (ComfyUI) name -> the row ranges of diffusers tensors it is made of. ComfyUI's model
    has one patch size, 2 (frames 1), as its own map says: another's embedder and final layer are
    left unnamed (refused)."""
    t = Table(tensors, "Z-Image")
    attention = {f"{b}.{n}.{p}" for b in _REFINED for n in t.blocks(b + ".")
                 for parts in _Z_IMAGE_ATTENTION.values() for p in parts}
    for name in t.rows:
        if (m := _Z_IMAGE_PATCH.match(name)) and m.group(2) == "2-1":
            t.key(m.group(1) + "." + name[m.end():], name)
        elif not m and name.rpartition(".")[0] not in attention:
            t.key(name, name)
    for blocks in _REFINED:
        t.stack(blocks, blocks, _Z_IMAGE_ATTENTION)
    return t.done("Z-Image")


# ----------------------------------------------------------------------------- Chroma

_CHROMA_TOP = {"img_in": ["x_embedder"], "txt_in": ["context_embedder"], "final_layer.linear": ["proj_out"],
               "distilled_guidance_layer.in_proj": ["distilled_guidance_layer.in_proj"],
               "distilled_guidance_layer.out_proj": ["distilled_guidance_layer.out_proj"]}
_CHROMA_DOUBLE = {k: v for k, v in FLUX_DOUBLE.items() if not k.endswith("_mod.lin")}
_CHROMA_SINGLE = {k: v for k, v in FLUX_SINGLE.items() if k != "modulation.lin"}
_CHROMA_DOUBLE_NORMS = {f"{s}_attn.norm.{n}_norm.weight": f"attn.norm_{a}{q}.weight"
                        for s, a in (("img", ""), ("txt", "added_")) for n, q in (("query", "q"), ("key", "k"))}
_CHROMA_SINGLE_NORMS = {"norm.query_norm.weight": "attn.norm_q.weight", "norm.key_norm.weight": "attn.norm_k.weight"}


def is_diffusers_chroma(names) -> bool:
    """A diffusers ChromaTransformer2DModel state dict."""
    names = set(names)
    return "distilled_guidance_layer.in_proj.weight" in names and "transformer_blocks.0.attn.to_q.weight" in names


def chroma_to_comfy(tensors: dict[str, TensorInfo]) -> dict[str, list[Part]]:
    """Chroma (ComfyUI) name -> the row ranges of diffusers tensors it is made of."""
    t = Table(tensors, "Chroma")
    for new, parts in _CHROMA_TOP.items():
        t.linear(new, parts)
    for n in t.blocks("distilled_guidance_layer.layers."):
        old = f"distilled_guidance_layer.layers.{n}."
        t.linear(old + "in_layer", [old + "linear_1"])
        t.linear(old + "out_layer", [old + "linear_2"])
    for n in t.blocks("distilled_guidance_layer.norms."):
        t.key(f"distilled_guidance_layer.norms.{n}.weight", f"distilled_guidance_layer.norms.{n}.weight")
    t.stack("transformer_blocks", "double_blocks", _CHROMA_DOUBLE, _CHROMA_DOUBLE_NORMS)
    t.stack("single_transformer_blocks", "single_blocks", _CHROMA_SINGLE, _CHROMA_SINGLE_NORMS)
    return t.done("Chroma")


# ----------------------------------------------------------------------------- FLUX.2

_FLUX2_TOP = {
    "img_in": ["x_embedder"], "txt_in": ["context_embedder"], "final_layer.linear": ["proj_out"],
    "time_in.in_layer": ["time_guidance_embed.timestep_embedder.linear_1"],
    "time_in.out_layer": ["time_guidance_embed.timestep_embedder.linear_2"],
    "guidance_in.in_layer": ["time_guidance_embed.guidance_embedder.linear_1"],
    "guidance_in.out_layer": ["time_guidance_embed.guidance_embedder.linear_2"],
    "double_stream_modulation_img.lin": ["double_stream_modulation_img.linear"],
    "double_stream_modulation_txt.lin": ["double_stream_modulation_txt.linear"],
    "single_stream_modulation.lin": ["single_stream_modulation.linear"],
}
_FLUX2_DOUBLE = {
    "img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "img_attn.proj": ["attn.to_out.0"], "txt_attn.proj": ["attn.to_add_out"],
    "img_mlp.0": ["ff.linear_in"], "img_mlp.2": ["ff.linear_out"],
    "txt_mlp.0": ["ff_context.linear_in"], "txt_mlp.2": ["ff_context.linear_out"],
}
_FLUX2_SINGLE = {"linear1": ["attn.to_qkv_mlp_proj"], "linear2": ["attn.to_out"]}


def is_diffusers_flux2(names) -> bool:
    """A diffusers Flux2Transformer2DModel state dict."""
    names = set(names)
    return "single_stream_modulation.linear.weight" in names and "x_embedder.weight" in names


def flux2_to_comfy(tensors: dict[str, TensorInfo]) -> dict[str, list[Part]]:
    """FLUX.2 (ComfyUI) name -> the row ranges of diffusers tensors it is made of."""
    t = Table(tensors, "FLUX.2")
    for new, parts in _FLUX2_TOP.items():
        t.linear(new, parts)
    t.linear("final_layer.adaLN_modulation.1", ["norm_out.linear"], swapped=True)
    t.stack("transformer_blocks", "double_blocks", _FLUX2_DOUBLE, _CHROMA_DOUBLE_NORMS)
    t.stack("single_transformer_blocks", "single_blocks", _FLUX2_SINGLE, _CHROMA_SINGLE_NORMS)
    return t.done("FLUX.2")


# ----------------------------------------------------------------------------- AuraFlow

_AURA_TOP = {"init_x_linear": ["pos_embed.proj"], "cond_seq_linear": ["context_embedder"],
             "t_embedder.mlp.0": ["time_step_proj.linear_1"], "t_embedder.mlp.2": ["time_step_proj.linear_2"],
             "final_linear": ["proj_out"]}
_AURA_MLP = {"c_fc1": "linear_1", "c_fc2": "linear_2", "c_proj": "out_projection"}
_AURA_DOUBLE = {
    **{f"attn.w2{a}": [f"attn.{b}"] for a, b in zip("qkvo", ("to_q", "to_k", "to_v", "to_out.0"))},
    **{f"attn.w1{a}": [f"attn.{b}"] for a, b in zip("qkvo", ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"))},
    **{f"mlpX.{a}": [f"ff.{b}"] for a, b in _AURA_MLP.items()},
    **{f"mlpC.{a}": [f"ff_context.{b}"] for a, b in _AURA_MLP.items()},
    "modX.1": ["norm1.linear"], "modC.1": ["norm1_context.linear"],
}
_AURA_SINGLE = {
    **{f"attn.w1{a}": [f"attn.{b}"] for a, b in zip("qkvo", ("to_q", "to_k", "to_v", "to_out.0"))},
    **{f"mlp.{a}": [f"ff.{b}"] for a, b in _AURA_MLP.items()}, "modCX.1": ["norm1.linear"],
}


def is_diffusers_auraflow(names) -> bool:
    """A diffusers AuraFlowTransformer2DModel state dict."""
    names = set(names)
    return "joint_transformer_blocks.0.attn.add_k_proj.weight" in names and "time_step_proj.linear_1.weight" in names


def auraflow_to_comfy(tensors: dict[str, TensorInfo]) -> dict[str, list[Part]]:
    """AuraFlow (ComfyUI) name -> the row ranges of diffusers tensors it is made of."""
    t = Table(tensors, "AuraFlow")
    t.key("positional_encoding", "pos_embed.pos_embed")
    t.key("register_tokens", "register_tokens")
    for new, parts in _AURA_TOP.items():
        t.linear(new, parts)
    t.linear("modF.1", ["norm_out.linear"], swapped=True)
    t.stack("joint_transformer_blocks", "double_layers", _AURA_DOUBLE)
    t.stack("single_transformer_blocks", "single_layers", _AURA_SINGLE)
    return t.done("AuraFlow")


# ----------------------------------------------------------------------------- PixArt

_PIXART_TOP = {
    "x_embedder.proj": ["pos_embed.proj"], "t_block.1": ["adaln_single.linear"], "final_layer.linear": ["proj_out"],
    "y_embedder.y_proj.fc1": ["caption_projection.linear_1"], "y_embedder.y_proj.fc2": ["caption_projection.linear_2"],
    **{f"{a}.mlp.{i}": [f"adaln_single.emb.{b}.linear_{j}"] for a, b in (
        ("t_embedder", "timestep_embedder"), ("csize_embedder", "resolution_embedder"),
        ("ar_embedder", "aspect_ratio_embedder")) for i, j in ((0, 1), (2, 2))},
}
_PIXART_BLOCK = {
    "attn.qkv": ["attn1.to_q", "attn1.to_k", "attn1.to_v"], "attn.proj": ["attn1.to_out.0"],
    "cross_attn.q_linear": ["attn2.to_q"], "cross_attn.kv_linear": ["attn2.to_k", "attn2.to_v"],
    "cross_attn.proj": ["attn2.to_out.0"], "mlp.fc1": ["ff.net.0.proj"], "mlp.fc2": ["ff.net.2"],
}


def is_diffusers_pixart(names) -> bool:
    """A diffusers PixArtTransformer2DModel state dict."""
    names = set(names)
    return ("adaln_single.emb.timestep_embedder.linear_1.weight" in names and "pos_embed.proj.weight" in names
            and "transformer_blocks.0.attn2.to_q.weight" in names)


def pixart_to_comfy(tensors: dict[str, TensorInfo]) -> dict[str, list[Part]]:
    """PixArt (ComfyUI) name -> the row ranges of diffusers tensors it is made of."""
    t = Table(tensors, "PixArt")
    t.key("final_layer.scale_shift_table", "scale_shift_table")
    t.key("y_embedder.y_embedding", "caption_projection.y_embedding")
    for new, parts in _PIXART_TOP.items():
        t.linear(new, parts)
    for n in t.blocks("transformer_blocks."):
        old, new = f"transformer_blocks.{n}.", f"blocks.{n}."
        t.key(new + "scale_shift_table", old + "scale_shift_table")
        for name, parts in _PIXART_BLOCK.items():
            t.linear(new + name, [old + p for p in parts])
    return t.done("PixArt")


# ----------------------------------------------------------------------------- HunyuanDiT

_HYDIT_TOP = {
    "x_embedder.proj": ["pos_embed.proj"], "mlp_t5.0": ["text_embedder.linear_1"], "mlp_t5.2": ["text_embedder.linear_2"],
    "t_embedder.mlp.0": ["time_extra_emb.timestep_embedder.linear_1"],
    "t_embedder.mlp.2": ["time_extra_emb.timestep_embedder.linear_2"],
    "extra_embedder.0": ["time_extra_emb.extra_embedder.linear_1"],
    "extra_embedder.2": ["time_extra_emb.extra_embedder.linear_2"],
    **{f"pooler.{p}": [f"time_extra_emb.pooler.{p}"] for p in ("k_proj", "q_proj", "v_proj", "c_proj")},
    "final_layer.linear": ["proj_out"],
}
_HYDIT_BLOCK = {       # blocks.N.<key> <- blocks.N.<parts>; Tencent's norm3 precedes the cross-attention, norm2 the MLP
    "norm1": ["norm1.norm"], "default_modulation.1": ["norm1.linear"], "norm3": ["norm2"], "norm2": ["norm3"],
    "attn1.Wqkv": ["attn1.to_q", "attn1.to_k", "attn1.to_v"], "attn1.out_proj": ["attn1.to_out.0"],
    "attn2.q_proj": ["attn2.to_q"], "attn2.kv_proj": ["attn2.to_k", "attn2.to_v"], "attn2.out_proj": ["attn2.to_out.0"],
    **{f"attn{i}.{x}_norm": [f"attn{i}.norm_{x}"] for i in (1, 2) for x in "qk"},
    "mlp.fc1": ["ff.net.0.proj"], "mlp.fc2": ["ff.net.2"], "skip_norm": ["skip_norm"], "skip_linear": ["skip_linear"],
}


def is_diffusers_hunyuan_dit(names) -> bool:
    """A diffusers HunyuanDiT2DModel state dict."""
    names = set(names)
    return "time_extra_emb.pooler.k_proj.weight" in names and "text_embedding_padding" in names


def hunyuan_dit_to_comfy(tensors: dict[str, TensorInfo]) -> dict[str, list[Part]]:
    """HunyuanDiT (ComfyUI, Tencent's names) name -> the row ranges of diffusers tensors it is made of."""
    t = Table(tensors, "HunyuanDiT")
    t.key("text_embedding_padding", "text_embedding_padding")
    t.key("pooler.positional_embedding", "time_extra_emb.pooler.positional_embedding")
    t.key("style_embedder.weight", "time_extra_emb.style_embedder.weight")
    for new, parts in _HYDIT_TOP.items():
        t.linear(new, parts)
    t.linear("final_layer.adaLN_modulation.1", ["norm_out.linear"], swapped=True)
    t.stack("blocks", "blocks", _HYDIT_BLOCK)
    return t.done("HunyuanDiT")


# ----------------------------------------------------------------------------- Stable Cascade

_CASCADE_ATTENTION = re.compile(r"(.*\.attention\.)(to_q|to_k|to_v|to_out\.0)\.(weight|bias)$")


def is_diffusers_stable_cascade(names) -> bool:
    """A diffusers StableCascadeUNet state dict (stage C or B): its attentions split into to_q/k/v."""
    names = set(names)
    return (("clip_txt_mapper.weight" in names or "clip_mapper.weight" in names) and "embedding.1.weight" in names
            and any(n.endswith(".attention.to_q.weight") for n in names))


def stable_cascade_to_comfy(tensors: dict[str, TensorInfo]) -> dict[str, list[Part]]:
    """Stable Cascade (ComfyUI) name -> the diffusers tensor it renames: every name is Stability's but
    the attentions', which ComfyUI holds as attention.attn.to_q/k/v and out_proj (it splits the
    release's in_proj itself on load; diffusers' converter splits it the same way)."""
    t = Table(tensors, "Stable Cascade")
    for name in t.rows:
        m = _CASCADE_ATTENTION.match(name)
        t.key(f"{m.group(1)}attn.{'out_proj' if m.group(2) == 'to_out.0' else m.group(2)}.{m.group(3)}" if m else name,
              name)
    return t.done("Stable Cascade")


VIEWS = (("PixArt", "PixArt", is_diffusers_pixart, pixart_to_comfy), ("AuraFlow", "AuraFlow", is_diffusers_auraflow, auraflow_to_comfy), ("FLUX.2", "FLUX.2", is_diffusers_flux2, flux2_to_comfy), ("Chroma", "Chroma", is_diffusers_chroma, chroma_to_comfy),
         ("Lumina 2", "Lumina 2", is_diffusers_lumina2, lumina2_to_comfy),
         ("Z-Image", "Z-Image", is_diffusers_z_image, z_image_to_comfy),
         ("HunyuanDiT", "HunyuanDiT", is_diffusers_hunyuan_dit, hunyuan_dit_to_comfy),
         ("Stable Cascade", "Stability", is_diffusers_stable_cascade, stable_cascade_to_comfy))
