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
"""
from __future__ import annotations

from .comfy_names import Part, Table
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
        for n in t.blocks(blocks + "."):
            old = new = f"{blocks}.{n}."
            for name, parts in _WAN_BLOCK.items():
                t.linear(new + name, [old + p for p in parts])
            for name, key in _WAN_BLOCK_KEYS.items():
                t.key(new + name, old + key)
    return t.done("Wan")


VIEWS = (("Wan", "Wan", is_diffusers_wan, wan_to_comfy),)
