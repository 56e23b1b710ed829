"""Diffusers video transformers under the key names ComfyUI loads (the original releases').

ComfyUI cannot load these families under diffusers' names at all, so for the comfy formats
``sources.open_source(..., names="comfyui")`` renames them as ``comfy_names`` does FLUX.1 and SD3
(same ``Table`` and ``RenamedView``; any source key the table does not name is refused). The
reference for each table is diffusers' own converter from the original names, which runs the
other way (``diffusers.loaders.single_file_utils.convert_wan_transformer_to_diffusers``), and
ComfyUI's model classes (``comfy/ldm/wan/model.py``).

Wan 2.1 / 2.2 (t2v, i2v with its image embedding, the 5B TI2V, VACE; renames only)::

    diffusers                                              Wan / ComfyUI
    condition_embedder.text_embedder.linear_{1,2}          text_embedding.{0,2}
    condition_embedder.time_embedder.linear_{1,2}          time_embedding.{0,2}
    condition_embedder.time_proj                           time_projection.1
    condition_embedder.image_embedder.norm1, ff.net.0.proj,
      ff.net.2, norm2, pos_embed                           img_emb.proj.{0,1,3,4}, img_emb.emb_pos
    N.attn1.to_{q,k,v}, to_out.0, norm_{q,k}               blocks.N.self_attn.{q,k,v,o,norm_q,norm_k}
    N.attn2.to_{q,k,v}, to_out.0, norm_{q,k}               blocks.N.cross_attn.{q,k,v,o,norm_q,norm_k}
    N.attn2.add_{k,v}_proj, norm_added_k                   blocks.N.cross_attn.{k_img,v_img,norm_k_img}
    N.norm2 (the cross-attention norm)                     blocks.N.norm3
    N.ffn.net.{0.proj,2}, N.scale_shift_table              blocks.N.ffn.{0,2}, blocks.N.modulation
    vace_blocks.N: the same, and proj_in, proj_out         vace_blocks.N...., before_proj, after_proj
    proj_out, scale_shift_table                            head.head, head.modulation
    patch_embedding, vace_patch_embedding                  (unchanged)

HunyuanVideo 1.0 (FLUX.1's double and single blocks, as ``comfy_names`` joins them; N: one token
refiner block)::

    diffusers                                              HunyuanVideo / ComfyUI
    x_embedder.proj                                        img_in.proj
    time_text_embed.{timestep,text,guidance}_embedder.linear_{1,2}
                                                           {time,vector,guidance}_in.{in,out}_layer
    context_embedder.proj_in                               txt_in.input_embedder
    context_embedder.time_text_embed.{timestep,text}_embedder.linear_{1,2}
                                                           txt_in.{t,c}_embedder.{in,out}_layer
    context_embedder.token_refiner.refiner_blocks.N.       txt_in.individual_token_refiner.blocks.N.
      norm1, norm2, attn.to_q + to_k + to_v, attn.to_out.0,  norm1, norm2, self_attn.qkv, self_attn.proj,
      ff.net.{0.proj,2}, norm_out.linear                     mlp.{0,2}, adaLN_modulation.1
    transformer_blocks.N, single_transformer_blocks.N      double_blocks.N, single_blocks.N (as FLUX.1's;
                                                           q/k norms: ...norm.{query,key}_norm.weight)
    proj_out, norm_out.linear (halves swapped)             final_layer.linear, final_layer.adaLN_modulation.1

HunyuanVideo 1.5 (1.0's table, double blocks only; no pooled text, guidance or single blocks)::

    diffusers                                              HunyuanVideo / ComfyUI
    time_embed.timestep_embedder.linear_{1,2}              time_in.{in,out}_layer
    context_embedder.*, transformer_blocks.N, proj_out, norm_out.linear
                                                           as 1.0's (txt_in.*, double_blocks.N, final_layer.*)
    context_embedder_2.norm, linear_{1,2,3}  (ByT5)        byt5_in.layernorm, fc{1,2,3}
    image_embedder.norm_in, linear_1, linear_2, norm_out   vision_in.proj.{0,1,3,4}
    cond_type_embed                                        cond_type_embedding

LTX-Video (renames only; every other key keeps its name)::

    diffusers                                              LTX-Video / ComfyUI
    proj_in, time_embed.*                                  patchify_proj, adaln_single.*
    transformer_blocks.N.attn{1,2}.norm_{q,k}              transformer_blocks.N.attn{1,2}.{q,k}_norm

LTX-2 is refused: ComfyUI's LTX-2 model also holds the video and audio text-embedding connectors
(``*_embeddings_connector.*``), which diffusers keeps in a component of their own (``connectors/``),
so the transformer alone would load in ComfyUI with those layers missing. Its release names
(``ltx2_names``: proj_in -> patchify_proj, time_embed -> adaln_single, av_cross_attn_* ->
av_ca_*_adaln_single, norm_{q,k} -> {q,k}_norm ...) serve ``plan`` only (``NAMES_ONLY``).

Mochi (N: transformer_blocks; the last one is context_pre_only: no context output or MLP)::

    diffusers                                              Genmo / ComfyUI
    patch_embed.proj, time_embed.timestep_embedder.linear_{1,2}
                                                           x_embedder.proj, t_embedder.mlp.{0,2}
    time_embed.pooler.{to_kv,to_q,to_out}, time_embed.caption_proj
                                                           t5_y_embedder.{to_kv,to_q,to_out}, t5_yproj
    N.norm1.linear, N.norm1_context.linear (last: linear_1)  blocks.N.mod_x, blocks.N.mod_y
    N.attn1.to_q + to_k + to_v, add_{q,k,v}_proj           blocks.N.attn.qkv_x, qkv_y
    N.attn1.norm_{q,k}, norm_added_{q,k}                   blocks.N.attn.{q,k}_norm_x, {q,k}_norm_y
    N.attn1.to_out.0, to_add_out                           blocks.N.attn.proj_x, proj_y
    N.ff{,_context}.net.0.proj (halves swapped), .net.2    blocks.N.mlp_{x,y}.w1, w2
    proj_out, norm_out.linear (halves swapped)             final_layer.linear, final_layer.mod

Cosmos Predict2 (renames only, diffusers' ``convert_cosmos_transformer_checkpoint_to_diffusers``
inverted; NVIDIA's names without ``net.``)::

    diffusers                                              NVIDIA / ComfyUI
    patch_embed.proj, proj_out                             x_embedder.proj.1, final_layer.linear
    time_embed.t_embedder.linear_{1,2}, time_embed.norm    t_embedder.1.linear_{1,2}, t_embedding_norm
    norm_out.linear_{1,2}                                  final_layer.adaln_modulation.{1,2}
    N.attn{1,2}.to_{q,k,v}, to_out.0, norm_{q,k}           blocks.N.{self,cross}_attn.{q,k,v}_proj, output_proj, {q,k}_norm
    N.ff.net.{0.proj,2}                                    blocks.N.mlp.layer{1,2}
    N.norm{1,2,3}.linear_{1,2}                             blocks.N.adaln_modulation_{self_attn,cross_attn,mlp}.{1,2}

Cosmos 1.0 (the same diffusers class, told from Predict2 by its learnable position embedding; renames
only, the converter's 1.0 table inverted; ComfyUI's GeneralDIT nests each block's three sub-blocks)::

    diffusers                                              NVIDIA / ComfyUI
    (top level as Predict2's, but)                         final_layer.adaLN_modulation.{1,2}, affline_norm
    learnable_pos_embed.pos_emb_{t,h,w}                    extra_pos_embedder.pos_emb_{t,h,w}
    N.attn{1,2}.to_{q,k,v}, norm_{q,k}, to_out.0           blocks.blockN.blocks.{0,1}.block.attn.to_{q,k,v}.0,
                                                           to_{q,k}.1, to_out.0
    N.ff.net.{0.proj,2}                                    blocks.blockN.blocks.2.block.layer{1,2}
    N.norm{1,2,3}.linear_{1,2}                             blocks.blockN.blocks.{0,1,2}.adaLN_modulation.{1,2}
"""
from __future__ import annotations

import re

from .comfy_names import FLUX_DOUBLE, FLUX_SINGLE, Part, Table
from .errors import UnsupportedInputError
from .reader import TensorInfo

# ----------------------------------------------------------------------------- Wan 2.1 / 2.2

_WAN_TOP = {
    "patch_embedding": ["patch_embedding"], "vace_patch_embedding": ["vace_patch_embedding"],
    "text_embedding.0": ["condition_embedder.text_embedder.linear_1"],
    "text_embedding.2": ["condition_embedder.text_embedder.linear_2"],
    "time_embedding.0": ["condition_embedder.time_embedder.linear_1"],
    "time_embedding.2": ["condition_embedder.time_embedder.linear_2"],
    "time_projection.1": ["condition_embedder.time_proj"],
    "img_emb.proj.0": ["condition_embedder.image_embedder.norm1"],
    "img_emb.proj.1": ["condition_embedder.image_embedder.ff.net.0.proj"],
    "img_emb.proj.3": ["condition_embedder.image_embedder.ff.net.2"],
    "img_emb.proj.4": ["condition_embedder.image_embedder.norm2"],
    "head.head": ["proj_out"],
}
_WAN_TOP_KEYS = {"img_emb.emb_pos": "condition_embedder.image_embedder.pos_embed", "head.modulation": "scale_shift_table"}
_WAN_BLOCK = {         # blocks.N.<key> <- blocks.N.<parts>, for .weight and .bias
    "self_attn.q": ["attn1.to_q"], "self_attn.k": ["attn1.to_k"], "self_attn.v": ["attn1.to_v"],
    "self_attn.o": ["attn1.to_out.0"],
    "cross_attn.q": ["attn2.to_q"], "cross_attn.k": ["attn2.to_k"], "cross_attn.v": ["attn2.to_v"],
    "cross_attn.o": ["attn2.to_out.0"],
    "cross_attn.k_img": ["attn2.add_k_proj"], "cross_attn.v_img": ["attn2.add_v_proj"],
    "norm3": ["norm2"], "ffn.0": ["ffn.net.0.proj"], "ffn.2": ["ffn.net.2"],
    "before_proj": ["proj_in"], "after_proj": ["proj_out"],          # VACE blocks only
}
_WAN_BLOCK_KEYS = {
    "modulation": "scale_shift_table",
    "self_attn.norm_q.weight": "attn1.norm_q.weight", "self_attn.norm_k.weight": "attn1.norm_k.weight",
    "cross_attn.norm_q.weight": "attn2.norm_q.weight", "cross_attn.norm_k.weight": "attn2.norm_k.weight",
    "cross_attn.norm_k_img.weight": "attn2.norm_added_k.weight",
}


def is_diffusers_wan(names) -> bool:
    """A diffusers WanTransformer3DModel / WanVACETransformer3DModel state dict."""
    names = set(names)
    return ("condition_embedder.time_proj.weight" in names and "patch_embedding.weight" in names
            and "blocks.0.attn1.to_q.weight" in names)


def wan_to_comfy(tensors: dict[str, TensorInfo]) -> dict[str, list[Part]]:
    """Wan (ComfyUI) name -> the diffusers tensor it renames."""
    t = Table(tensors, "Wan")
    for new, parts in _WAN_TOP.items():
        t.linear(new, parts)
    for new, old in _WAN_TOP_KEYS.items():
        t.key(new, old)
    for blocks in ("blocks", "vace_blocks"):
        t.stack(blocks, blocks, _WAN_BLOCK, _WAN_BLOCK_KEYS)
    return t.done("Wan")


# ----------------------------------------------------------------------------- HunyuanVideo 1.0

_HUNYUAN_TOP = {
    "img_in.proj": ["x_embedder.proj"],
    "time_in.in_layer": ["time_text_embed.timestep_embedder.linear_1"],
    "time_in.out_layer": ["time_text_embed.timestep_embedder.linear_2"],
    "vector_in.in_layer": ["time_text_embed.text_embedder.linear_1"],
    "vector_in.out_layer": ["time_text_embed.text_embedder.linear_2"],
    "guidance_in.in_layer": ["time_text_embed.guidance_embedder.linear_1"],
    "guidance_in.out_layer": ["time_text_embed.guidance_embedder.linear_2"],
    "txt_in.input_embedder": ["context_embedder.proj_in"],
    "txt_in.t_embedder.in_layer": ["context_embedder.time_text_embed.timestep_embedder.linear_1"],
    "txt_in.t_embedder.out_layer": ["context_embedder.time_text_embed.timestep_embedder.linear_2"],
    "txt_in.c_embedder.in_layer": ["context_embedder.time_text_embed.text_embedder.linear_1"],
    "txt_in.c_embedder.out_layer": ["context_embedder.time_text_embed.text_embedder.linear_2"],
    "final_layer.linear": ["proj_out"],
}
_HUNYUAN_REFINER = {   # txt_in.individual_token_refiner.blocks.N.<key> <- ...refiner_blocks.N.<parts>
    "norm1": ["norm1"], "norm2": ["norm2"], "self_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "self_attn.proj": ["attn.to_out.0"], "mlp.0": ["ff.net.0.proj"], "mlp.2": ["ff.net.2"],
    "adaLN_modulation.1": ["norm_out.linear"],
}
_HUNYUAN_DOUBLE_NORMS = {
    "img_attn.norm.query_norm.weight": "attn.norm_q.weight", "img_attn.norm.key_norm.weight": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.weight": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.weight": "attn.norm_added_k.weight",
}
_HUNYUAN_SINGLE_NORMS = {"norm.query_norm.weight": "attn.norm_q.weight", "norm.key_norm.weight": "attn.norm_k.weight"}


def is_diffusers_hunyuan_video(names) -> bool:
    """A diffusers HunyuanVideoTransformer3DModel state dict."""
    names = set(names)
    return ("context_embedder.token_refiner.refiner_blocks.0.attn.to_q.weight" in names
            and "x_embedder.proj.weight" in names and "single_transformer_blocks.0.proj_mlp.weight" in names)


def hunyuan_video_to_comfy(tensors: dict[str, TensorInfo]) -> dict[str, list[Part]]:
    """HunyuanVideo (ComfyUI) name -> the row ranges of diffusers tensors it is made of."""
    t = Table(tensors, "HunyuanVideo")
    for new, parts in _HUNYUAN_TOP.items():
        t.linear(new, parts)
    t.stack("context_embedder.token_refiner.refiner_blocks", "txt_in.individual_token_refiner.blocks", _HUNYUAN_REFINER)
    t.stack("transformer_blocks", "double_blocks", FLUX_DOUBLE, _HUNYUAN_DOUBLE_NORMS)
    t.stack("single_transformer_blocks", "single_blocks", FLUX_SINGLE, _HUNYUAN_SINGLE_NORMS)
    t.linear("final_layer.adaLN_modulation.1", ["norm_out.linear"], swapped=True)
    return t.done("HunyuanVideo")


# ----------------------------------------------------------------------------- HunyuanVideo 1.5

_HUNYUAN15_TOP = {
    **{k: v for k, v in _HUNYUAN_TOP.items() if not k.startswith(("time_in.", "vector_in.", "guidance_in."))},
    "time_in.in_layer": ["time_embed.timestep_embedder.linear_1"],
    "time_in.out_layer": ["time_embed.timestep_embedder.linear_2"],
    "byt5_in.layernorm": ["context_embedder_2.norm"], "byt5_in.fc1": ["context_embedder_2.linear_1"],
    "byt5_in.fc2": ["context_embedder_2.linear_2"], "byt5_in.fc3": ["context_embedder_2.linear_3"],
    "vision_in.proj.0": ["image_embedder.norm_in"], "vision_in.proj.1": ["image_embedder.linear_1"],
    "vision_in.proj.3": ["image_embedder.linear_2"], "vision_in.proj.4": ["image_embedder.norm_out"],
}


def is_diffusers_hunyuan_video15(names) -> bool:
    """A diffusers HunyuanVideo15Transformer3DModel state dict (double blocks only, a ByT5 and an image embedder)."""
    names = set(names)
    return ("context_embedder_2.linear_1.weight" in names and "x_embedder.proj.weight" in names
            and "transformer_blocks.0.norm1_context.linear.weight" in names and "cond_type_embed.weight" in names)


def hunyuan_video15_to_comfy(tensors: dict[str, TensorInfo]) -> dict[str, list[Part]]:
    """HunyuanVideo 1.5 (ComfyUI) name -> the row ranges of diffusers tensors it is made of: 1.0's
    table without single blocks, pooled text or guidance, with the ByT5 and image embedders."""
    t = Table(tensors, "HunyuanVideo 1.5")
    for new, parts in _HUNYUAN15_TOP.items():
        t.linear(new, parts)
    t.key("cond_type_embedding.weight", "cond_type_embed.weight")
    t.stack("context_embedder.token_refiner.refiner_blocks", "txt_in.individual_token_refiner.blocks", _HUNYUAN_REFINER)
    t.stack("transformer_blocks", "double_blocks", FLUX_DOUBLE, _HUNYUAN_DOUBLE_NORMS)
    t.linear("final_layer.adaLN_modulation.1", ["norm_out.linear"], swapped=True)
    return t.done("HunyuanVideo 1.5")


# ----------------------------------------------------------------------------- LTX-Video

_LTX_TOP = {
    "patchify_proj": ["proj_in"],
    "adaln_single.emb.timestep_embedder.linear_1": ["time_embed.emb.timestep_embedder.linear_1"],
    "adaln_single.emb.timestep_embedder.linear_2": ["time_embed.emb.timestep_embedder.linear_2"],
    "adaln_single.linear": ["time_embed.linear"],
    "caption_projection.linear_1": ["caption_projection.linear_1"],
    "caption_projection.linear_2": ["caption_projection.linear_2"], "proj_out": ["proj_out"],
}
_LTX_BLOCK = {f"attn{i}.{p}": [f"attn{i}.{p}"] for i in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")}
_LTX_BLOCK.update({"ff.net.0.proj": ["ff.net.0.proj"], "ff.net.2": ["ff.net.2"]})
_LTX_BLOCK_KEYS = {"scale_shift_table": "scale_shift_table",
                   **{f"attn{i}.{q}_norm.weight": f"attn{i}.norm_{q}.weight" for i in (1, 2) for q in "qk"}}


def is_diffusers_ltx(names) -> bool:
    """A diffusers LTXVideoTransformer3DModel state dict (not LTX-2's, which has an audio stream)."""
    names = set(names)
    return ("time_embed.emb.timestep_embedder.linear_1.weight" in names and "proj_in.weight" in names
            and "transformer_blocks.0.attn1.norm_q.weight" in names and "caption_projection.linear_1.weight" in names
            and not any(n.startswith("audio_") for n in names))


def ltx_to_comfy(tensors: dict[str, TensorInfo]) -> dict[str, list[Part]]:
    """LTX-Video (ComfyUI) name -> the diffusers tensor it renames."""
    t = Table(tensors, "LTX-Video")
    for new, parts in _LTX_TOP.items():
        t.linear(new, parts)
    t.key("scale_shift_table", "scale_shift_table")
    t.stack("transformer_blocks", "transformer_blocks", _LTX_BLOCK, _LTX_BLOCK_KEYS)
    return t.done("LTX-Video")


# ----------------------------------------------------------------------------- LTX-2 (refused)

def is_diffusers_ltx2(names) -> bool:
    """A diffusers LTX2VideoTransformer3DModel state dict (the audio-video one)."""
    names = set(names)
    return "audio_proj_in.weight" in names and "transformer_blocks.0.audio_attn1.to_q.weight" in names


# diffusers name piece -> the LTX-2 release's (diffusers' convert_ltx2_transformer_to_diffusers inverted)
_LTX2_RENAMES = (("av_cross_attn_video_scale_shift", "av_ca_video_scale_shift_adaln_single"),
                 ("av_cross_attn_video_a2v_gate", "av_ca_a2v_gate_adaln_single"),
                 ("av_cross_attn_audio_scale_shift", "av_ca_audio_scale_shift_adaln_single"),
                 ("av_cross_attn_audio_v2a_gate", "av_ca_v2a_gate_adaln_single"),
                 ("video_a2v_cross_attn_scale_shift_table", "scale_shift_table_a2v_ca_video"),
                 ("audio_a2v_cross_attn_scale_shift_table", "scale_shift_table_a2v_ca_audio"),
                 ("proj_in", "patchify_proj"), ("norm_q", "q_norm"), ("norm_k", "k_norm"))


def ltx2_names(tensors: dict[str, TensorInfo]) -> dict[str, list[Part]]:
    """LTX-2 (the release's, ComfyUI's) name -> the diffusers tensor it renames; the text connectors
    ComfyUI's model also holds are not among them. For ``plan`` to know the family; a file written
    from it would lack the connectors (``ltx2_refused``)."""
    t = Table(tensors, "LTX-2")
    for name in t.rows:
        new = re.sub(r"^(audio_)?time_embed\.", r"\1adaln_single.", name)
        for old, release in _LTX2_RENAMES:
            new = new.replace(old, release)
        t.key(new, name)
    return t.done("LTX-2")


def ltx2_refused(tensors: dict[str, TensorInfo]) -> dict[str, list[Part]]:
    raise UnsupportedInputError(
        "a diffusers LTX-2 transformer has no ComfyUI file of its own: ComfyUI's LTX-2 model also holds the text"
        " embeddings connectors (video_/audio_embeddings_connector), which diffusers keeps apart in connectors/",
        hint="for ComfyUI, convert the LTX-2 release's single-file checkpoint (such as ltx-2-19b-dev.safetensors);"
             " for diffusers, write --format native")


# ----------------------------------------------------------------------------- Mochi

_MOCHI_TOP = {
    "x_embedder.proj": ["patch_embed.proj"],
    "t_embedder.mlp.0": ["time_embed.timestep_embedder.linear_1"],
    "t_embedder.mlp.2": ["time_embed.timestep_embedder.linear_2"],
    "t5_y_embedder.to_kv": ["time_embed.pooler.to_kv"], "t5_y_embedder.to_q": ["time_embed.pooler.to_q"],
    "t5_y_embedder.to_out": ["time_embed.pooler.to_out"], "t5_yproj": ["time_embed.caption_proj"],
    "final_layer.linear": ["proj_out"],
}
_MOCHI_BLOCK = {       # blocks.N.<key> <- transformer_blocks.N.<parts>, for .weight and .bias
    "mod_x": ["norm1.linear"], "mod_y": ["norm1_context.linear"],
    "attn.qkv_x": ["attn1.to_q", "attn1.to_k", "attn1.to_v"],
    "attn.qkv_y": ["attn1.add_q_proj", "attn1.add_k_proj", "attn1.add_v_proj"],
    "attn.proj_x": ["attn1.to_out.0"], "attn.proj_y": ["attn1.to_add_out"],
    "attn.q_norm_x": ["attn1.norm_q"], "attn.k_norm_x": ["attn1.norm_k"],
    "attn.q_norm_y": ["attn1.norm_added_q"], "attn.k_norm_y": ["attn1.norm_added_k"],
    "mlp_x.w2": ["ff.net.2"], "mlp_y.w2": ["ff_context.net.2"],
}


def is_diffusers_mochi(names) -> bool:
    """A diffusers MochiTransformer3DModel state dict."""
    names = set(names)
    return "time_embed.pooler.to_kv.weight" in names and "pos_frequencies" in names


def mochi_to_comfy(tensors: dict[str, TensorInfo]) -> dict[str, list[Part]]:
    """Mochi (ComfyUI) name -> the row ranges of diffusers tensors it is made of. The SwiGLU input
    projections hold (gate, value) in Genmo's order and (value, gate) in diffusers': halves swapped."""
    t = Table(tensors, "Mochi")
    t.key("pos_frequencies", "pos_frequencies")
    for new, parts in _MOCHI_TOP.items():
        t.linear(new, parts)
    t.linear("final_layer.mod", ["norm_out.linear"], swapped=True)
    for n in t.blocks("transformer_blocks."):
        old, new = f"transformer_blocks.{n}.", f"blocks.{n}."
        for name, parts in _MOCHI_BLOCK.items():
            t.linear(new + name, [old + p for p in parts])
        t.linear(new + "mod_y", [old + "norm1_context.linear_1"])        # the last, context_pre_only block
        t.linear(new + "mlp_x.w1", [old + "ff.net.0.proj"], swapped=True)
        t.linear(new + "mlp_y.w1", [old + "ff_context.net.0.proj"], swapped=True)
    return t.done("Mochi")


# ----------------------------------------------------------------------------- Cosmos Predict2

_COSMOS2_TOP = {
    "x_embedder.proj.1": ["patch_embed.proj"], "final_layer.linear": ["proj_out"],
    "t_embedder.1.linear_1": ["time_embed.t_embedder.linear_1"],
    "t_embedder.1.linear_2": ["time_embed.t_embedder.linear_2"],
    "final_layer.adaln_modulation.1": ["norm_out.linear_1"], "final_layer.adaln_modulation.2": ["norm_out.linear_2"],
}
_COSMOS2_BLOCK = {     # blocks.N.<key> <- transformer_blocks.N.<parts>, for .weight and .bias
    **{f"{a}.{x}_proj": [f"{b}.to_{x}"] for a, b in (("self_attn", "attn1"), ("cross_attn", "attn2")) for x in "qkv"},
    **{f"{a}.output_proj": [f"{b}.to_out.0"] for a, b in (("self_attn", "attn1"), ("cross_attn", "attn2"))},
    **{f"{a}.{x}_norm": [f"{b}.norm_{x}"] for a, b in (("self_attn", "attn1"), ("cross_attn", "attn2")) for x in "qk"},
    "mlp.layer1": ["ff.net.0.proj"], "mlp.layer2": ["ff.net.2"],
    **{f"adaln_modulation_{a}.{i}": [f"norm{n}.linear_{i}"]
       for n, a in ((1, "self_attn"), (2, "cross_attn"), (3, "mlp")) for i in (1, 2)},
}


def is_diffusers_cosmos_predict2(names) -> bool:
    """A diffusers CosmosTransformer3DModel of Cosmos Predict2 (Cosmos 1.0 has the learnable
    position embedding, ComfyUI's extra_pos_embedder, that Predict2 does without)."""
    names = set(names)
    return ("time_embed.t_embedder.linear_1.weight" in names and "patch_embed.proj.weight" in names
            and "transformer_blocks.0.norm1.linear_1.weight" in names
            and not any(n.startswith("learnable_pos_embed.") for n in names))


def cosmos_predict2_to_comfy(tensors: dict[str, TensorInfo]) -> dict[str, list[Part]]:
    """Cosmos Predict2 (ComfyUI, NVIDIA's names without ``net.``) name -> the diffusers tensor it renames."""
    t = Table(tensors, "Cosmos Predict2")
    for new, parts in _COSMOS2_TOP.items():
        t.linear(new, parts)
    t.key("t_embedding_norm.weight", "time_embed.norm.weight")
    t.stack("transformer_blocks", "blocks", _COSMOS2_BLOCK)
    return t.done("Cosmos Predict2")


# ----------------------------------------------------------------------------- Cosmos 1.0

_COSMOS1_BLOCK = {     # blocks.blockN.<key> <- transformer_blocks.N.<parts>: sub-blocks 0 (self-attention),
    # 1 (cross-attention), 2 (MLP) as block_config "FA-CA-MLP" nests them, each with its adaLN modulation
    **{f"blocks.{i}.block.attn.to_{x}.0": [f"attn{i + 1}.to_{x}"] for i in (0, 1) for x in "qkv"},
    **{f"blocks.{i}.block.attn.to_{x}.1": [f"attn{i + 1}.norm_{x}"] for i in (0, 1) for x in "qk"},
    **{f"blocks.{i}.block.attn.to_out.0": [f"attn{i + 1}.to_out.0"] for i in (0, 1)},
    "blocks.2.block.layer1": ["ff.net.0.proj"], "blocks.2.block.layer2": ["ff.net.2"],
    **{f"blocks.{n - 1}.adaLN_modulation.{i}": [f"norm{n}.linear_{i}"] for n in (1, 2, 3) for i in (1, 2)},
}


def is_diffusers_cosmos1(names) -> bool:
    """A diffusers CosmosTransformer3DModel of Cosmos 1.0 (its learnable position embedding, ComfyUI's
    extra_pos_embedder, is what tells it from Predict2)."""
    names = set(names)
    return ("time_embed.t_embedder.linear_1.weight" in names and "patch_embed.proj.weight" in names
            and "transformer_blocks.0.norm1.linear_1.weight" in names
            and any(n.startswith("learnable_pos_embed.") for n in names))


def cosmos1_to_comfy(tensors: dict[str, TensorInfo]) -> dict[str, list[Part]]:
    """Cosmos 1.0 (ComfyUI's GeneralDIT, NVIDIA's names without ``net.``) name -> the diffusers tensor it renames."""
    t = Table(tensors, "Cosmos 1.0")
    for new, parts in _COSMOS2_TOP.items():            # 1.0 spells the final modulation adaLN_modulation
        t.linear(new.replace("adaln_modulation", "adaLN_modulation"), parts)
    t.key("affline_norm.weight", "time_embed.norm.weight")
    for axis in "thw":
        t.key(f"extra_pos_embedder.pos_emb_{axis}", f"learnable_pos_embed.pos_emb_{axis}")
    for n in t.blocks("transformer_blocks."):
        for name, parts in _COSMOS1_BLOCK.items():
            t.linear(f"blocks.block{n}.{name}", [f"transformer_blocks.{n}.{p}" for p in parts])
    return t.done("Cosmos 1.0")


VIEWS = (("Wan", "Wan", is_diffusers_wan, wan_to_comfy), ("Mochi", "Genmo", is_diffusers_mochi, mochi_to_comfy), ("LTX-2", "LTX-2", is_diffusers_ltx2, ltx2_refused),
         ("LTX-Video", "LTX-Video", is_diffusers_ltx, ltx_to_comfy),
         ("HunyuanVideo", "HunyuanVideo", is_diffusers_hunyuan_video, hunyuan_video_to_comfy),
         ("HunyuanVideo 1.5", "HunyuanVideo", is_diffusers_hunyuan_video15, hunyuan_video15_to_comfy),
         ("Cosmos Predict2", "Cosmos", is_diffusers_cosmos_predict2, cosmos_predict2_to_comfy),
         ("Cosmos 1.0", "Cosmos", is_diffusers_cosmos1, cosmos1_to_comfy))

# Tables that name a family for ``plan`` where no file can be written under them (by family).
NAMES_ONLY = {"LTX-2": ltx2_names}
