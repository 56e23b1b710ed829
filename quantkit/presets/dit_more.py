"""Presets for more DiT families ComfyUI runs, under its names: CogVideoX (1.0 / 1.5, t2v / i2v / inpaint),
OmniGen2 / Boogu-Image, Hunyuan3D 2.1 (MoE shape DiT), Krea 2, Ernie-Image, Lens, Ideogram 4, JoyImage and
HiDream-O1 (a Qwen3-VL decoder that denoises pixel patches; the llm preset used to take it).

``plan`` called them ``generic`` (HiDream-O1: ``llm``). Their per-block AdaLN projections stay BF16 here:
they read the timestep embedding alone, so FP8 saves memory but no compute, and their error shifts, scales
and gates every token (the caveat the flux preset documents).
"""
from __future__ import annotations

from .base import _WHY_NORMS, K, Q, _Architecture, _mat, _preset, _Signature
from .diffusion import _WHY_EMBED, _WHY_FINAL
from .video import WHY_ATTN, WHY_BULK, WHY_GLOBAL_MODULATION, WHY_TEXT_INPUT

WHY_BLOCK_ADALN = ("per-block AdaLN projection of the timestep embedding: one small matmul per step (FP8 saves "
                   "memory, no compute) whose output shifts, scales and gates every token, so its error is coherent "
                   "over the whole frame; kept, as convert-to-quant keeps Z-Image's adaLN_modulation")
WHY_ROUTER = ("MoE router: tiny, its error changes which experts run, and ComfyUI holds it as a bare parameter "
              "(MoEGate.weight), not a Linear, so it cannot carry an FP8 scale")

# ----------------------------------------------------------------------------- CogVideoX

_COGVIDEOX_RULES = (
    (Q, r"re:blocks\.\d+\.(q|k|v|attn_out)\.weight"),
    (Q, r"re:blocks\.\d+\.(ff_proj|ff_out)\.weight"),
    (K, r"re:blocks\.\d+\.(norm1|norm2)\.linear\..*"),
    (K, "patch_embed.*"), (K, "time_embedding_linear_*"), (K, "ofs_embedding_linear_*"),
    (K, "norm_out.*"), (K, "proj_out.*"),
)


def _cogvideox_block(q, mod, text_proj):   # q [h, h]; norm1.linear [6h, t]; patch_embed.text_proj [h, c]
    h = q[1]
    return _mat(q, h, h) and _mat(mod, 6 * h) and _mat(text_proj, h)


def _cogvideox_variant(infos, root):
    proj = infos.get(root + "patch_embed.proj.weight")
    if proj is None:
        return "CogVideoX"
    version = "1.5" if len(proj.shape) == 2 else "1.0"
    channels = proj.shape[1] // 8 if len(proj.shape) == 2 else proj.shape[1]
    task = {32: "i2v", 48: "inpaint"}.get(channels, "t2v")
    return f"CogVideoX {version} {task}"


COGVIDEOX = _preset(
    "cogvideox", "CogVideoX video transformer (ComfyUI names): attention and MLP in FP8, AdaLN and embedders kept",
    _Architecture((
        _Signature(r"blocks\.(?P<i>\d+)\.q\.weight", ("blocks.{i}.norm1.linear.weight", "patch_embed.text_proj.weight"),
                   _cogvideox_block, _COGVIDEOX_RULES),
    )),
    detection=("ComfyUI names: blocks.N.q [h,h] with blocks.N.norm1.linear [6h,t] (ComfyUI's marker) and "
               "patch_embed.text_proj [h,c] under one prefix; the variant from patch_embed.proj (conv = 1.0, "
               "linear = 1.5) and its input channels (16 t2v, 32 i2v, 48 inpaint)"),
    quantizes=(("blocks.N.q, k, v, attn_out", WHY_ATTN),
               ("blocks.N.ff_proj, ff_out", WHY_BULK)),
    keeps=(("blocks.N.norm1.linear, norm2.linear", WHY_BLOCK_ADALN),
           ("patch_embed (proj and text_proj), time_embedding_linear_1/2, ofs_embedding_linear_1/2",
            _WHY_EMBED + "; text_proj: " + WHY_TEXT_INPUT),
           ("norm_out.linear, proj_out", _WHY_FINAL),
           ("norms, biases", _WHY_NORMS)),
    reference=("No peer keep list for CogVideoX; embedders and final layer kept as in every DiT preset, and the "
               "per-block AdaLN (6h x time_embed_dim, about a fifth of the block weights) kept."),
    attention="blocks.N.q/k/v/attn_out",
    variant=_cogvideox_variant,
)

# ----------------------------------------------------------------------------- OmniGen2

_OMNIGEN2_BLOCKS = r"re:(layers|single_stream_layers|noise_refiner|ref_image_refiner|context_refiner)\.\d+\."
_OMNIGEN2_RULES = (
    (Q, _OMNIGEN2_BLOCKS + r"attn\.(to_q|to_k|to_v|to_out\.0)\.weight"),
    (Q, _OMNIGEN2_BLOCKS + r"feed_forward\.(linear_1|linear_2|linear_3)\.weight"),
    (K, _OMNIGEN2_BLOCKS + r"norm1\.linear\..*"),
    (K, "x_embedder.*"), (K, "ref_image_patch_embedder.*"), (K, "time_caption_embed.*"),
    (K, "image_index_embedding"), (K, "norm_out.*"),
)
# Boogu-Image: OmniGen2's blocks (its main stack named single_stream_layers) after a dual-stream stage whose
# image and instruction streams have attention, SwiGLU and AdaLN projections of their own.
_BOOGU_DOUBLE = r"re:double_stream_layers\.\d+\."
_BOOGU_RULES = _OMNIGEN2_RULES + (
    (Q, _BOOGU_DOUBLE + r"img_instruct_attn\.processor\.(img|instruct)_(to_q|to_k|to_v|out)\.weight"),
    (Q, _BOOGU_DOUBLE + r"(img_instruct_attn|img_self_attn)\.to_out\.0\.weight"),
    (Q, _BOOGU_DOUBLE + r"img_self_attn\.(to_q|to_k|to_v)\.weight"),
    (Q, _BOOGU_DOUBLE + r"(img|instruct)_feed_forward\.(linear_1|linear_2|linear_3)\.weight"),
    (K, _BOOGU_DOUBLE + r"(img|instruct)_norm\d\.linear\..*"),
)


def _omnigen2_block(q, mod, caption, ref_embedder):
    # attn.to_q [h, h]; norm1.linear [4h, min(h, 1024)]; caption_embedder.1 [h, c]; ref_image_patch_embedder [h, .]
    h = q[1]
    return _mat(q, h, h) and _mat(mod, 4 * h, min(h, 1024)) and _mat(caption, h) and _mat(ref_embedder, h)


OMNIGEN2 = _preset(
    "omnigen2", "OmniGen2 / Boogu-Image transformer (ComfyUI names, Lumina-like): attention and MLP in FP8, "
                "AdaLN, embedders and the final layer kept",
    _Architecture((
        _Signature(r"layers\.(?P<i>\d+)\.attn\.to_q\.weight",
                   ("layers.{i}.norm1.linear.weight", "time_caption_embed.caption_embedder.1.weight",
                    "ref_image_patch_embedder.weight"), _omnigen2_block, _OMNIGEN2_RULES),
        _Signature(r"single_stream_layers\.(?P<i>\d+)\.attn\.to_q\.weight",
                   ("single_stream_layers.{i}.norm1.linear.weight", "time_caption_embed.caption_embedder.1.weight",
                    "ref_image_patch_embedder.weight"), _omnigen2_block, _BOOGU_RULES),
    )),
    detection=("ComfyUI names: layers.N.attn.to_q [h,h] with layers.N.norm1.linear [4h,min(h,1024)], "
               "time_caption_embed.caption_embedder and ref_image_patch_embedder under one prefix (ComfyUI keys "
               "on time_caption_embed.timestep_embedder; ref_image_patch_embedder tells it from Lumina 2). "
               "Boogu-Image: the same with single_stream_layers.N for layers.N (its dual-stream stage, "
               "double_stream_layers.N.img_instruct_attn, is ComfyUI's marker)"),
    quantizes=(("attn.to_q, to_k, to_v, to_out.0 of layers, noise/ref-image/context refiners; Boogu's "
                "double_stream_layers img/instruct to_q/k/v/out, img_self_attn, to_out.0", WHY_ATTN),
               ("feed_forward.linear_1/2/3 (SwiGLU) of the same blocks, Boogu's img/instruct_feed_forward",
                WHY_BULK)),
    keeps=(("norm1.linear of every modulated block, Boogu's img_norm1-3 / instruct_norm1-2.linear",
            WHY_BLOCK_ADALN),
           ("x_embedder, ref_image_patch_embedder, time_caption_embed (timestep and caption embedders), "
            "image_index_embedding", _WHY_EMBED),
           ("norm_out.linear_1/linear_2", _WHY_FINAL),
           ("norms, biases", _WHY_NORMS)),
    reference=("No peer keep list for OmniGen2; follows the lumina2 preset's reading of the same Lumina-style "
               "blocks (attention and SwiGLU quantized; embedders and final layer kept)."),
    attention="layers/refiners N.attn.to_q/to_k/to_v/to_out.0",
    variant=lambda infos, root: ("Boogu-Image" if root + "single_stream_layers.0.attn.to_q.weight" in infos
                                 else "OmniGen2"),
)

# ----------------------------------------------------------------------------- Hunyuan3D 2.1

_HUNYUAN3D21_RULES = (
    (Q, r"re:blocks\.\d+\.(attn1|attn2)\.(to_q|to_k|to_v|out_proj)\.weight"),
    (Q, r"re:blocks\.\d+\.mlp\.(fc1|fc2)\.weight"),
    (Q, r"re:blocks\.\d+\.moe\.(experts\.\d+|shared_experts)\.net\.(0\.proj|2)\.weight"),
    (Q, r"re:blocks\.\d+\.skip_linear\.weight"),
    (K, r"re:blocks\.\d+\.moe\.gate\..*"), (K, r"re:blocks\.\d+\.default_modulation\..*"),
    (K, "x_embedder.*"), (K, "t_embedder.*"), (K, "final_layer.*"),
)


def _hunyuan3d21_block(k_norm, q, x_embedder):   # attn1.k_norm [d]; attn1.to_q [h, h]; x_embedder [h, c]
    h = q[1]
    return len(k_norm) == 1 and _mat(q, h, h) and _mat(x_embedder, h)


HUNYUAN3D21 = _preset(
    "hunyuan3d21", "Hunyuan3D 2.1 shape DiT (ComfyUI names, MoE blocks): attention, MLP and experts in FP8, "
                   "routers and embedders kept",
    _Architecture((
        _Signature(r"blocks\.(?P<i>\d+)\.attn1\.k_norm\.weight",
                   ("blocks.{i}.attn1.to_q.weight", "x_embedder.weight", "t_embedder.mlp.2.weight"),
                   lambda k_norm, q, x_emb, t: _hunyuan3d21_block(k_norm, q, x_emb), _HUNYUAN3D21_RULES),
    )),
    detection=("ComfyUI names: blocks.N.attn1.k_norm with blocks.N.attn1.to_q [h,h], x_embedder [h,c] and "
               "t_embedder.mlp.2 under one prefix (ComfyUI's marker: t_embedder.mlp.2 with blocks.0.attn1.k_norm)"),
    quantizes=(("attn1/attn2 to_q, to_k, to_v, out_proj", WHY_ATTN),
               ("mlp.fc1/fc2, moe experts and shared_experts net.0.proj/net.2", WHY_BULK),
               ("skip_linear (the long skip's fusion of two streams)", WHY_BULK + "; the hunyuan_dit preset "
                "quantizes the same layer")),
    keeps=(("blocks.N.moe.gate", WHY_ROUTER),
           ("x_embedder, t_embedder (and its cond_proj where present)", _WHY_EMBED),
           ("final_layer.linear", _WHY_FINAL),
           ("norms, biases", _WHY_NORMS)),
    reference=("No peer keep list for Hunyuan3D 2.1; the hunyuan_dit preset's rules for the same block layout, "
               "with the MoE routers kept as in the hidream preset."),
    attention="blocks.N.attn1/attn2.to_q/to_k/to_v/out_proj",
    variant=lambda infos, root: "Hunyuan3D 2.1",
)

# ----------------------------------------------------------------------------- HiDream-O1

_HIDREAM_O1_RULES = (
    (Q, r"re:language_model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)\.weight"),
    (Q, r"re:language_model\.layers\.\d+\.mlp\.(gate_proj|up_proj|down_proj)\.weight"),
    (K, "visual.*"), (K, "language_model.embed_tokens"), (K, "t_embedder1.*"), (K, "x_embedder.*"),
    (K, "final_layer2.*"),
)


def _hidream_o1_block(q, t_embedder, proj1, final):   # q_proj [., h]; t_embedder1.mlp.0 [h, f]; final_layer2 [p, h]
    h = q[1]
    return _mat(q, None, h) and _mat(t_embedder, h) and _mat(proj1) and _mat(final, None, h)


HIDREAM_O1 = _preset(
    "hidream_o1", "HiDream-O1 pixel-space model (ComfyUI names, a Qwen3-VL decoder that denoises image patches): "
                  "the decoder's attention and MLP in FP8; vision tower, patch/time embedders and final layer kept",
    _Architecture((
        _Signature(r"language_model\.layers\.(?P<i>\d+)\.self_attn\.q_proj\.weight",
                   ("t_embedder1.mlp.0.weight", "x_embedder.proj1.weight", "final_layer2.linear.weight"),
                   _hidream_o1_block, _HIDREAM_O1_RULES),
    )),
    detection=("ComfyUI names: language_model.layers.N.self_attn.q_proj beside t_embedder1.mlp.0 and "
               "x_embedder.proj1 (ComfyUI's marker) and final_layer2.linear under one prefix. Its decoder looks like "
               "an LLM, and the llm preset used to claim it (and quantize final_layer2, its pixel output)"),
    quantizes=(("language_model.layers.N.self_attn q/k/v/o_proj", WHY_ATTN),
               ("language_model.layers.N.mlp gate/up/down_proj", WHY_BULK)),
    keeps=(("x_embedder.proj1/proj2 (the pixel-patch bottleneck), t_embedder1, language_model.embed_tokens",
            _WHY_EMBED),
           ("final_layer2.linear (hidden state to a 32x32 RGB patch)", _WHY_FINAL),
           ("visual.* (the Qwen3-VL vision tower for reference images)", "as the qwen25_vl preset keeps its "
            "tower: it runs once per reference image, and its error reaches every token that attends to it"),
           ("norms, biases", _WHY_NORMS)),
    reference=("No peer keep list for HiDream-O1; the llm preset's reading of its decoder, with the diffusion "
               "inputs and output kept as in every DiT preset."),
    attention="language_model.layers.N.self_attn.q_proj/k_proj/v_proj/o_proj",
    variant=lambda infos, root: "HiDream-O1",
    owns_nested=True,
)

# ----------------------------------------------------------------------------- Krea 2

_KREA2_RULES = (
    (Q, r"re:blocks\.\d+\.attn\.(wq|wk|wv|wo|gate)\.weight"),
    (Q, r"re:blocks\.\d+\.mlp\.(gate|up|down)\.weight"),
    (K, r"re:blocks\.\d+\.mod\.lin"), (K, "tproj.*"), (K, "tmlp.*"), (K, "txtmlp.*"), (K, "txtfusion.*"),
    (K, "first.*"), (K, "last.*"),
)


def _krea2_block(wq, projector, first):   # attn.wq [h, h]; txtfusion.projector [1, layers]; first [h, c*p*p]
    h = wq[1]
    return _mat(wq, h, h) and _mat(projector, 1) and _mat(first, h)


KREA2 = _preset(
    "krea2", "Krea 2 single-stream image transformer (ComfyUI names): attention and SwiGLU in FP8; global "
             "modulation, text fusion, embedders and the last layer kept",
    _Architecture((
        _Signature(r"blocks\.(?P<i>\d+)\.attn\.wq\.weight", ("txtfusion.projector.weight", "first.weight"),
                   _krea2_block, _KREA2_RULES),
    )),
    detection=("ComfyUI names: blocks.N.attn.wq [h,h] beside txtfusion.projector [1,layers] (ComfyUI's marker) "
               "and first [h,c] under one prefix"),
    quantizes=(("blocks.N.attn.wq, wk, wv, wo and its output gate", WHY_ATTN),
               ("blocks.N.mlp.gate, up, down (SwiGLU)", WHY_BULK)),
    keeps=(("tproj (the one projection of the timestep into every block's six modulation vectors; each block "
            "adds only a bare mod.lin bias)", WHY_GLOBAL_MODULATION),
           ("txtfusion.* (layer-wise and refiner blocks over the text encoder's hidden layers), txtmlp",
            WHY_TEXT_INPUT + "; a few % of the weights, kept whole as the hunyuan_video preset keeps its token "
            "refiner"),
           ("first (patch input), tmlp (timestep embedder)", _WHY_EMBED),
           ("last.linear, last.modulation", _WHY_FINAL),
           ("norms (RMSNorm scale), bare modulation biases (mod.lin)", _WHY_NORMS)),
    reference="No peer keep list for Krea 2; the DiT presets' reading (global modulation, text input, embedders "
              "and last layer kept).",
    attention="blocks.N.attn.wq/wk/wv/wo/gate",
    variant=lambda infos, root: "Krea 2",
)

# ----------------------------------------------------------------------------- Ernie-Image

_ERNIE_RULES = (
    (Q, r"re:layers\.\d+\.self_attention\.(to_q|to_k|to_v|to_out\.0)\.weight"),
    (Q, r"re:layers\.\d+\.mlp\.(gate_proj|up_proj|linear_fc2)\.weight"),
    (K, "adaLN_modulation.*"), (K, "x_embedder.*"), (K, "text_proj"), (K, "time_embedding.*"),
    (K, "final_norm.*"), (K, "final_linear.*"),
)


def _ernie_block(q, fc2, ada, final):   # to_q [h, h]; linear_fc2 [h, f]; adaLN_modulation.1 [6h, h]; final [., h]
    h = q[1]
    return _mat(q, h, h) and _mat(fc2, h) and _mat(ada, 6 * h, h) and _mat(final, None, h)


ERNIE_IMAGE = _preset(
    "ernie_image", "Ernie-Image transformer (ComfyUI names, one AdaLN shared by every block): attention and SwiGLU "
                   "in FP8; the shared modulation, embedders and final layer kept",
    _Architecture((
        _Signature(r"layers\.(?P<i>\d+)\.self_attention\.to_q\.weight",
                   ("layers.{i}.mlp.linear_fc2.weight", "adaLN_modulation.1.weight", "final_linear.weight"),
                   _ernie_block, _ERNIE_RULES),
    )),
    detection=("ComfyUI names: layers.N.self_attention.to_q [h,h] with layers.N.mlp.linear_fc2 [h,f] (ComfyUI's "
               "marker), adaLN_modulation.1 [6h,h] and final_linear under one prefix"),
    quantizes=(("layers.N.self_attention.to_q, to_k, to_v, to_out.0", WHY_ATTN),
               ("layers.N.mlp.gate_proj, up_proj, linear_fc2 (SwiGLU)", WHY_BULK)),
    keeps=(("adaLN_modulation (the one timestep projection every block shares)", WHY_GLOBAL_MODULATION),
           ("x_embedder (conv patch input), text_proj, time_embedding", _WHY_EMBED),
           ("final_norm.linear, final_linear", _WHY_FINAL),
           ("norms, biases", _WHY_NORMS)),
    reference="No peer keep list for Ernie-Image; the DiT presets' reading (shared AdaLN, embedders and final layer "
              "kept).",
    attention="layers.N.self_attention.to_q/to_k/to_v/to_out.0",
    variant=lambda infos, root: "Ernie-Image",
)

# ----------------------------------------------------------------------------- Lens

_LENS_RULES = (
    (Q, r"re:transformer_blocks\.\d+\.attn\.(img_qkv|txt_qkv|to_out\.0|to_add_out)\.weight"),
    (Q, r"re:transformer_blocks\.\d+\.(img_mlp|txt_mlp)\.(w1|w2|w3)\.weight"),
    (K, r"re:transformer_blocks\.\d+\.(img_mod|txt_mod)\..*"),
    (K, "img_in.*"), (K, "txt_in.*"), (K, "time_text_embed.*"), (K, "norm_out.*"), (K, "proj_out.*"),
)


def _lens_block(qkv, mod, w1, txt_in):   # attn.img_qkv [3h, h]; img_mod.1 [6h, h]; img_mlp.w1 [f, h]; txt_in [h, .]
    h = qkv[1]
    return _mat(qkv, 3 * h, h) and _mat(mod, 6 * h, h) and _mat(w1, None, h) and _mat(txt_in, h)


LENS = _preset(
    "lens", "Lens dual-stream image transformer (ComfyUI names, Qwen-Image-like blocks with fused q/k/v): attention "
            "and SwiGLU in FP8; per-block modulation, embedders and the final layer kept",
    _Architecture((
        _Signature(r"transformer_blocks\.(?P<i>\d+)\.attn\.img_qkv\.weight",
                   ("transformer_blocks.{i}.img_mod.1.weight", "transformer_blocks.{i}.img_mlp.w1.weight",
                    "txt_in.weight"), _lens_block, _LENS_RULES),
    )),
    detection=("ComfyUI names: transformer_blocks.N.attn.img_qkv [3h,h] with img_mod.1 [6h,h], img_mlp.w1 (ComfyUI's "
               "marker, with attn.norm_added_q) and txt_in [h,.] under one prefix"),
    quantizes=(("attn.img_qkv, txt_qkv, to_out.0, to_add_out", WHY_ATTN),
               ("img_mlp / txt_mlp w1, w2, w3 (SwiGLU)", WHY_BULK)),
    keeps=(("img_mod.1, txt_mod.1 of every block", WHY_BLOCK_ADALN),
           ("img_in, txt_in (over the text encoder's selected layers), txt_norm, time_text_embed", _WHY_EMBED),
           ("norm_out.linear, proj_out", _WHY_FINAL),
           ("norms, biases", _WHY_NORMS)),
    reference=("No peer keep list for Lens. Its blocks are Qwen-Image's with q/k/v fused; unlike the qwen_image "
               "preset (which follows comfy-quants and quantizes img_mod/txt_mod past block 0) the AdaLN is kept, as "
               "in this module's other presets."),
    attention="transformer_blocks.N.attn.img_qkv/txt_qkv/to_out.0/to_add_out",
    variant=lambda infos, root: "Lens",
)

# ----------------------------------------------------------------------------- Ideogram 4

_IDEOGRAM4_RULES = (
    (Q, r"re:layers\.\d+\.attention\.(qkv|o)\.weight"),
    (Q, r"re:layers\.\d+\.feed_forward\.(w1|w2|w3)\.weight"),
    (K, r"re:layers\.\d+\.adaln_modulation\..*"), (K, "adaln_proj.*"), (K, "input_proj.*"), (K, "llm_cond_proj.*"),
    (K, "t_embedding.*"), (K, "embed_image_indicator"), (K, "final_layer.*"),
)


def _ideogram4_block(qkv, ada, indicator, input_proj):   # qkv [3h, h]; adaln_modulation [4h, a]; indicator [2, h]
    h = qkv[1]
    return _mat(qkv, 3 * h, h) and _mat(ada, 4 * h) and _mat(indicator, 2, h) and _mat(input_proj, h)


IDEOGRAM4 = _preset(
    "ideogram4", "Ideogram 4 single-stream image transformer (ComfyUI names): attention and SwiGLU in FP8; AdaLN, "
                 "embedders and the final layer kept",
    _Architecture((
        _Signature(r"layers\.(?P<i>\d+)\.attention\.qkv\.weight",
                   ("layers.{i}.adaln_modulation.weight", "embed_image_indicator.weight", "input_proj.weight"),
                   _ideogram4_block, _IDEOGRAM4_RULES),
    )),
    detection=("ComfyUI names: layers.N.attention.qkv [3h,h] with layers.N.adaln_modulation [4h,a], "
               "embed_image_indicator [2,h] (ComfyUI's marker) and input_proj [h,c] under one prefix"),
    quantizes=(("layers.N.attention.qkv, o", WHY_ATTN),
               ("layers.N.feed_forward.w1, w2, w3 (SwiGLU)", WHY_BULK)),
    keeps=(("layers.N.adaln_modulation", WHY_BLOCK_ADALN),
           ("adaln_proj (the timestep's projection every block's AdaLN reads)", WHY_GLOBAL_MODULATION),
           ("input_proj, llm_cond_proj, t_embedding, embed_image_indicator", _WHY_EMBED),
           ("final_layer.linear, final_layer.adaln_modulation", _WHY_FINAL),
           ("norms, biases", _WHY_NORMS)),
    reference="No peer keep list for Ideogram 4; the DiT presets' reading (AdaLN, embedders and final layer kept).",
    attention="layers.N.attention.qkv/o",
    variant=lambda infos, root: "Ideogram 4",
)

# ----------------------------------------------------------------------------- JoyImage

_JOYIMAGE_RULES = (
    (Q, r"re:double_blocks\.\d+\.attn\.(img|txt)_attn_(qkv|proj)\.weight"),
    (Q, r"re:double_blocks\.\d+\.(img_mlp|txt_mlp)\.net\.(0\.proj|2)\.weight"),
    (K, r"re:double_blocks\.\d+\.(img_mod|txt_mod)\..*"),
    (K, "img_in.*"), (K, "condition_embedder.*"), (K, "norm_out.*"), (K, "proj_out.*"),
)


def _joyimage_block(qkv, table, time_proj):   # attn.img_attn_qkv [3h, h]; img_mod.modulate_table [1, 6, h]; [6h, h]
    h = qkv[1]
    return _mat(qkv, 3 * h, h) and table == (1, 6, h) and _mat(time_proj, 6 * h, h)


JOYIMAGE = _preset(
    "joyimage", "JoyImage dual-stream transformer (ComfyUI names): attention and MLP in FP8; the global timestep "
                "projection, embedders and output kept",
    _Architecture((
        _Signature(r"double_blocks\.(?P<i>\d+)\.attn\.img_attn_qkv\.weight",
                   ("double_blocks.{i}.img_mod.modulate_table", "condition_embedder.time_proj.weight"),
                   _joyimage_block, _JOYIMAGE_RULES),
    )),
    detection=("ComfyUI names: double_blocks.N.attn.img_attn_qkv [3h,h] with double_blocks.N.img_mod.modulate_table "
               "[1,6,h] and condition_embedder.time_proj [6h,h] under one prefix (ComfyUI also reads a 5-D img_in)"),
    quantizes=(("double_blocks.N.attn img/txt_attn_qkv, img/txt_attn_proj", WHY_ATTN),
               ("double_blocks.N.img_mlp / txt_mlp net.0.proj, net.2", WHY_BULK)),
    keeps=(("condition_embedder.time_proj (the one timestep projection into every block's six modulation vectors; "
            "each block adds only a bare modulate_table)", WHY_GLOBAL_MODULATION),
           ("img_in (a Conv3d patch), condition_embedder time/text embedders", _WHY_EMBED),
           ("proj_out", _WHY_FINAL),
           ("norms, biases, modulate_table", _WHY_NORMS)),
    reference="No peer keep list for JoyImage; the DiT presets' reading (global modulation, embedders and output kept).",
    attention="double_blocks.N.attn.img_attn_qkv/img_attn_proj/txt_attn_qkv/txt_attn_proj",
    variant=lambda infos, root: "JoyImage",
)
