"""Image diffusion presets under ComfyUI's names: FLUX.2, Chroma, Lumina 2 / Z-Image, HiDream, AuraFlow,
PixArt and HunyuanDiT.

Each registers itself (in this order) through ``_preset``, after the diffusion and video presets. Keys are
those of ComfyUI's own model classes (``comfy/ldm/*``); each signature mirrors how ComfyUI tells the family
apart (``comfy/model_detection.py``). diffusers-named sources of these families are not recognised here.
"""
from __future__ import annotations

from .base import _WHY_NORMS, K, Q, _Architecture, _mat, _preset, _Signature
from .diffusion import _WHY_EMBED, _WHY_FINAL, _keep_flag, _why_modulation
from .video import WHY_ATTN, WHY_BULK, WHY_GLOBAL_MODULATION, WHY_PEER_MOD, WHY_TEXT_INPUT

_WHY_BFL_SINGLE = ("the single blocks' fused linear1 (q, k, v and the MLP input) and linear2 (attention output "
                   "and MLP output): mostly MLP, so quantized in both recipes, as in the flux preset")


def _bfl_blocks_rules():
    return (
        (Q, r"re:double_blocks\.\d+\.(img_attn|txt_attn)\.(qkv|proj)\.weight"),
        (Q, r"re:double_blocks\.\d+\.(img_mlp|txt_mlp)\.\d+\.weight"),
        (Q, r"re:single_blocks\.\d+\.(linear1|linear2)\.weight"),
    )


# ----------------------------------------------------------------------------- FLUX.2

_FLUX2_RULES = _bfl_blocks_rules() + (
    (K, "double_stream_modulation_img.*"), (K, "double_stream_modulation_txt.*"), (K, "single_stream_modulation.*"),
    (K, "img_in"), (K, "txt_in"), (K, "time_in.*"), (K, "guidance_in.*"), (K, "final_layer.*"),
)


def _flux2(mod_img, mod_single, img_in):   # double_stream_modulation_img.lin [6h, h], single [3h, h], img_in [h, c]
    h = mod_img[1]
    return _mat(mod_img, 6 * h, h) and _mat(mod_single, 3 * h, h) and _mat(img_in, h)


FLUX2 = _preset(
    "flux2", "FLUX.2 transformer (BFL/ComfyUI names): block attention and MLPs in FP8, the global modulation kept",
    _Architecture((
        _Signature(r"double_stream_modulation_img\.lin\.weight",
                   ("single_stream_modulation.lin.weight", "img_in.weight"), _flux2, _FLUX2_RULES),
    )),
    detection=("BFL/ComfyUI names: double_stream_modulation_img.lin [6h,h] with single_stream_modulation.lin [3h,h] "
               "and img_in [h,c] under one prefix (ComfyUI's own marker for FLUX.2)"),
    quantizes=(("double blocks' img_attn/txt_attn qkv and proj", WHY_ATTN),
               ("img_mlp/txt_mlp, single blocks' linear1/linear2", _WHY_BFL_SINGLE)),
    keeps=(("double_stream_modulation_img/txt.lin, single_stream_modulation.lin", WHY_GLOBAL_MODULATION +
            "; FLUX.2 has no per-block modulation: these three are shared by every block"),
           ("img_in, txt_in, time_in, guidance_in", _WHY_EMBED),
           ("final_layer.linear, final_layer.adaLN_modulation", _WHY_FINAL),
           ("norms, biases", _WHY_NORMS)),
    reference=("Matches convert-to-quant's --flux2 (FLUX2_LAYER_KEYNAMES: stream_modulation, guidance_in, time_in, "
               "final_layer, img_in, txt_in) and the Comfy-Org list in the peer survey."),
    attention="double_blocks.N.img_attn.qkv/proj, txt_attn.qkv/proj; single blocks' linear1/linear2 join attention "
              "with the MLP and are quantized as MLP",
    variant=lambda infos, root: ("FLUX.2 [dev]" if infos[root + "img_in.weight"].shape[0] == 6144 else "FLUX.2"),
)


# ----------------------------------------------------------------------------- Chroma

_CHROMA_RULES = _bfl_blocks_rules() + (
    (K, "distilled_guidance_layer.*"), (K, "img_in"), (K, "img_in_patch"), (K, "txt_in"), (K, "final_layer.*"),
    (K, "nerf_*"),
)


def _chroma(qkv, out_proj):         # img_attn.qkv [3h, h]; distilled_guidance_layer.out_proj [h, d]
    h = qkv[1]
    return _mat(qkv, 3 * h, h) and _mat(out_proj, h)


CHROMA = _preset(
    "chroma", "Chroma / Chroma Radiance (BFL/ComfyUI names): block attention and MLPs in FP8, the distilled "
              "guidance approximator kept",
    _Architecture((
        _Signature(r"double_blocks\.(?P<i>\d+)\.img_attn\.qkv\.weight", ("distilled_guidance_layer.out_proj.weight",),
                   _chroma, _CHROMA_RULES),
    )),
    detection=("BFL/ComfyUI names: double_blocks.N.img_attn.qkv [3h,h] with distilled_guidance_layer.out_proj [h,d] "
               "under one prefix; Radiance when nerf_blocks.* are present"),
    quantizes=(("double blocks' img_attn/txt_attn qkv and proj", WHY_ATTN),
               ("img_mlp/txt_mlp, single blocks' linear1/linear2", _WHY_BFL_SINGLE)),
    keeps=(("distilled_guidance_layer.* (the approximator)", "produces every modulation vector of every block "
            "from the timestep and guidance: Chroma's replacement for FLUX's per-block modulation, so its error "
            "is coherent over the image; ~5% of the weights (convert-to-quant's DISTILL_LAYER_KEYNAMES_LARGE)"),
           ("img_in, txt_in (Radiance: img_in_patch conv)", _WHY_EMBED),
           ("final_layer.* (Radiance: nerf_* pixel-space head)", _WHY_FINAL),
           ("norms, biases", _WHY_NORMS)),
    reference=("Matches convert-to-quant's Chroma keep list (distilled_guidance_layer, final_layer, img_in, txt_in). "
               "The generic policy quantized the approximator; Chroma was then the worst family of a ComfyUI "
               "round trip of tiny random models (cosine 0.9956)."),
    attention="double_blocks.N.img_attn.qkv/proj, txt_attn.qkv/proj",
    variant=lambda infos, root: ("Chroma Radiance" if any(k.startswith(root + "nerf_blocks.") for k in infos)
                                 else "Chroma"),
)


# ----------------------------------------------------------------------------- Lumina 2 / Z-Image

_LUMINA_RULES = (
    (Q, r"re:(layers|noise_refiner|context_refiner)\.\d+\.attention\.(qkv|out)\.weight"),
    (Q, r"re:(layers|noise_refiner|context_refiner)\.\d+\.feed_forward\.(w1|w2|w3)\.weight"),
    (K, r"re:(layers|noise_refiner|context_refiner)\.\d+\.adaLN_modulation\..*"),
    (K, "x_embedder"), (K, "cap_embedder.*"), (K, "t_embedder.*"), (K, "siglip_embedder.*"),
    (K, "clip_text_pooled_proj.*"), (K, "time_text_embed.*"), (K, "final_layer.*"),
)


def _lumina_block(qkv, w1, cap):    # attention.qkv [(n+2kv)d, h]; feed_forward.w1 [f, h]; cap_embedder.1 [h, c]
    h = qkv[1]
    return _mat(qkv, None, h) and _mat(w1, None, h) and _mat(cap, h)


def _lumina_variant(infos: dict, root: str) -> str:
    if any(k.startswith(root) and k.endswith(".adaLN_modulation.0.weight") for k in infos):
        return "Z-Image (pixel space)" if root + "dec_net.cond_embed.weight" in infos else "Z-Image"
    return "Lumina 2 (NewBie)" if root + "clip_text_pooled_proj.0.weight" in infos else "Lumina 2"


LUMINA2 = _preset(
    "lumina2", "Lumina 2 / Z-Image (NextDiT, ComfyUI names): attention and FFN in FP8, adaLN modulation, "
               "embedders and final layer kept",
    _Architecture((
        _Signature(r"layers\.(?P<i>\d+)\.attention\.qkv\.weight",
                   ("layers.{i}.feed_forward.w1.weight", "cap_embedder.1.weight"), _lumina_block, _LUMINA_RULES),
    )),
    detection=("ComfyUI names: layers.N.attention.qkv with layers.N.feed_forward.w1 and cap_embedder.1 [h,c] under "
               "one prefix (ComfyUI keys on cap_embedder.1 and noise_refiner's k_norm). Z-Image when the blocks' "
               "modulation is adaLN_modulation.0 (Z-Image's), Lumina 2 when it is adaLN_modulation.1 (ComfyUI "
               "tells them by width, 3840 against 2304)"),
    quantizes=(("attention.qkv, attention.out of layers, noise_refiner, context_refiner", WHY_ATTN),
               ("feed_forward w1, w2, w3", WHY_BULK)),
    keeps=(("per-block adaLN_modulation", "convert-to-quant's ZIMAGE_LAYER_KEYNAMES keeps it; in Z-Image it reads a "
            "256-wide timestep vector, so it is small (~2% of the weights), and it scales and gates every token"),
           ("x_embedder, cap_embedder.*, t_embedder.*, siglip_embedder, clip_text_pooled_proj", _WHY_EMBED),
           ("final_layer.linear, final_layer.adaLN_modulation", _WHY_FINAL),
           ("norms (attention_norm1/2, ffn_norm1/2, q/k norms), pad tokens, biases", _WHY_NORMS)),
    reference=("Matches convert-to-quant's --zimage list (final_layer, adaLN_modulation, x_embedder, cap_embedder.1, "
               "t_embedder); the same choice is applied to Lumina 2, which has the same blocks."),
    attention="layers/noise_refiner/context_refiner.N.attention.qkv, attention.out",
    variant=_lumina_variant,
)


# ----------------------------------------------------------------------------- HiDream

_HIDREAM_MOD_FLAG = _keep_flag(r"re:.*_stream_blocks\.\d+\.block\.adaLN_modulation\.1", "ComfyUI names")
_HIDREAM_BLOCK = r"re:(double|single)_stream_blocks\.\d+\.block\."
_HIDREAM_RULES = (
    (Q, _HIDREAM_BLOCK + r"attn1\.(to_q|to_k|to_v|to_out|to_q_t|to_k_t|to_v_t|to_out_t)\.weight"),
    (Q, _HIDREAM_BLOCK + r"(ff_i\.shared_experts|ff_i\.experts\.\d+|ff_t)\.(w1|w2|w3)\.weight"),
    (Q, _HIDREAM_BLOCK + r"adaLN_modulation\.1\.weight"),
    (K, _HIDREAM_BLOCK + r"ff_i\.gate"),
    (K, "caption_projection.*"), (K, "x_embedder.*"), (K, "t_embedder.*"), (K, "p_embedder.*"),
    (K, "final_layer.*"),
)


def _hidream_block(q_t, mod):       # attn1.to_q_t [h, h]; adaLN_modulation.1 [12h, h]
    h = q_t[1]
    return _mat(q_t, h, h) and _mat(mod, 12 * h, h)


HIDREAM = _preset(
    "hidream", "HiDream-I1 / E1 transformer (ComfyUI names): attention, experts and modulation in FP8, MoE routers "
               "and caption projections kept",
    _Architecture((
        _Signature(r"double_stream_blocks\.(?P<i>\d+)\.block\.attn1\.to_q_t\.weight",
                   ("double_stream_blocks.{i}.block.adaLN_modulation.1.weight",), _hidream_block, _HIDREAM_RULES),
    )),
    detection=("ComfyUI names: double_stream_blocks.N.block.attn1.to_q_t [h,h] with block.adaLN_modulation.1 "
               "[12h,h] under one prefix (ComfyUI keys on caption_projection.0.linear)"),
    quantizes=(("attn1 to_q/k/v/out and the text stream's to_q_t/k_t/v_t/out_t", WHY_ATTN),
               ("ff_i experts and shared_experts, ff_t (w1, w2, w3)", WHY_BULK),
               ("per-block adaLN_modulation.1", WHY_PEER_MOD + _why_modulation(
                   "the peer survey found no published HiDream keep list that spares it",
                   "about 15% of the block weights", _HIDREAM_MOD_FLAG))),
    keeps=(("ff_i.gate (MoE routers)", "ComfyUI's MoEGate holds the router as a bare Parameter, not a Linear, so an "
            "FP8 router is read without its scale and routes wrongly (a HiDream file made with the generic "
            "policy measured cosine 0.965 in ComfyUI); small, and its error changes which experts run"),
           ("caption_projection.* (the text encoders' input projections)", WHY_TEXT_INPUT),
           ("x_embedder, t_embedder, p_embedder", _WHY_EMBED),
           ("final_layer.linear, final_layer.adaLN_modulation", _WHY_FINAL),
           ("norms, biases", _WHY_NORMS)),
    reference=("Follows the peer survey's list (routers, caption_projection, final_layer kept); per-block "
               "modulation is "
               "quantized as in the flux preset, add " + _HIDREAM_MOD_FLAG + " to keep it."),
    attention="double/single_stream_blocks.N.block.attn1.to_q/k/v/out (and to_q_t/k_t/v_t/out_t)",
    variant=lambda infos, root: "HiDream",
)


# ----------------------------------------------------------------------------- AuraFlow

_AURA_MOD_FLAG = _keep_flag(r"re:.*_layers\.\d+\.(modX|modC|modCX)\.1", "ComfyUI names")
_AURAFLOW_RULES = (
    (Q, r"re:(double|single)_layers\.\d+\.attn\.(w1q|w1k|w1v|w1o|w2q|w2k|w2v|w2o)\.weight"),
    (Q, r"re:(double|single)_layers\.\d+\.(mlpX|mlpC|mlp)\.(c_fc1|c_fc2|c_proj)\.weight"),
    (Q, r"re:(double|single)_layers\.\d+\.(modX|modC|modCX)\.1\.weight"),
    (K, "init_x_linear"), (K, "cond_seq_linear"), (K, "t_embedder.*"), (K, "final_linear"), (K, "modF.*"),
)


def _aura_block(q, mod):            # attn.w1q [h, h]; modX.1 [6h, h]
    h = q[1]
    return _mat(q, h, h) and _mat(mod, 6 * h, h)


AURAFLOW = _preset(
    "auraflow", "AuraFlow (ComfyUI names): attention, MLP and per-block modulation in FP8, input/output layers kept",
    _Architecture((
        _Signature(r"double_layers\.(?P<i>\d+)\.attn\.w1q\.weight", ("double_layers.{i}.modX.1.weight",),
                   _aura_block, _AURAFLOW_RULES),
        _Signature(r"single_layers\.(?P<i>\d+)\.attn\.w1q\.weight", ("single_layers.{i}.modCX.1.weight",),
                   _aura_block, _AURAFLOW_RULES),
    )),
    detection=("ComfyUI names: double_layers.N.attn.w1q [h,h] with modX.1 [6h,h] (ComfyUI's marker), or "
               "single_layers.N.attn.w1q with modCX.1 [6h,h], under one prefix"),
    quantizes=(("attn w1q/k/v/o, w2q/k/v/o", WHY_ATTN),
               ("mlpX/mlpC/mlp c_fc1, c_fc2, c_proj", WHY_BULK),
               ("per-block modX.1, modC.1, modCX.1", WHY_PEER_MOD + _why_modulation(
                   "AuraFlow's FP8 files follow the every-nn.Linear rule", "about a quarter of the block weights",
                   _AURA_MOD_FLAG))),
    keeps=(("init_x_linear, cond_seq_linear, t_embedder", _WHY_EMBED + " (the image and text input projections)"),
           ("final_linear, modF", _WHY_FINAL),
           ("register_tokens, positional_encoding", "bare parameters: never quantized"),
           ("norms, biases", _WHY_NORMS)),
    reference=("No peer keep list for AuraFlow; the input, text and output projections are kept as in every DiT "
               "preset (the generic policy quantized all four)."),
    attention="double_layers/single_layers.N.attn.w1q/w1k/w1v/w1o (and w2* in the double layers)",
    variant=lambda infos, root: "AuraFlow",
)


# ----------------------------------------------------------------------------- PixArt

_PIXART_RULES = (
    (Q, r"re:blocks\.\d+\.attn\.(qkv|proj)\.weight"),
    (Q, r"re:blocks\.\d+\.cross_attn\.(q_linear|kv_linear|proj)\.weight"),
    (Q, r"re:blocks\.\d+\.mlp\.(fc1|fc2)\.weight"),
    (K, "t_block.*"), (K, "x_embedder.*"), (K, "t_embedder.*"), (K, "y_embedder.*"), (K, "ar_embedder.*"),
    (K, "csize_embedder.*"), (K, "final_layer.*"),
)


def _pixart_block(q, qkv, t_block):   # cross_attn.q_linear [h, h]; attn.qkv [3h, h]; t_block.1 [6h, h]
    h = q[1]
    return _mat(q, h, h) and _mat(qkv, 3 * h, h) and _mat(t_block, 6 * h, h)


PIXART = _preset(
    "pixart", "PixArt-alpha / PixArt-Sigma (ComfyUI names): attention, cross-attention and MLP in FP8, the shared "
              "adaLN-single kept",
    _Architecture((
        _Signature(r"blocks\.(?P<i>\d+)\.cross_attn\.q_linear\.weight",
                   ("blocks.{i}.attn.qkv.weight", "t_block.1.weight"), _pixart_block, _PIXART_RULES),
    )),
    detection=("ComfyUI names: blocks.N.cross_attn.q_linear [h,h] with attn.qkv [3h,h] and t_block.1 [6h,h] under "
               "one prefix (ComfyUI keys on t_block.1). PixArt-alpha when ar_embedder (micro-conditions) is present"),
    quantizes=(("attn.qkv, attn.proj, cross_attn q_linear/kv_linear/proj", WHY_ATTN),
               ("mlp fc1, fc2", WHY_BULK)),
    keeps=(("t_block.1 (adaLN-single)", WHY_GLOBAL_MODULATION + "; every block adds its own scale_shift_table to it"),
           ("x_embedder (conv), t_embedder, y_embedder (caption projection), ar/csize embedders", _WHY_EMBED),
           ("final_layer.linear", _WHY_FINAL),
           ("scale_shift_table, y_embedding", "bare parameters: never quantized"),
           ("norms, biases", _WHY_NORMS)),
    reference=("No peer keep list for PixArt; the final layer (which the generic policy quantized), the embedders "
               "and the shared modulation are kept as in the LTX preset, which has the same adaLN-single design."),
    attention="blocks.N.attn.qkv/proj, cross_attn.q_linear/kv_linear/proj",
    variant=lambda infos, root: ("PixArt-alpha" if root + "ar_embedder.mlp.0.weight" in infos else "PixArt-Sigma"),
)


# ----------------------------------------------------------------------------- HunyuanDiT

_HYDIT_RULES = (
    (Q, r"re:blocks\.\d+\.attn1\.(Wqkv|out_proj)\.weight"),
    (Q, r"re:blocks\.\d+\.attn2\.(q_proj|kv_proj|out_proj)\.weight"),
    (Q, r"re:blocks\.\d+\.mlp\.(fc1|fc2)\.weight"),
    (Q, r"re:blocks\.\d+\.skip_linear\.weight"),
    (K, r"re:blocks\.\d+\.default_modulation\..*"),
    (K, "mlp_t5.*"), (K, "pooler.*"), (K, "x_embedder.*"), (K, "t_embedder.*"), (K, "extra_embedder.*"),
    (K, "style_embedder"), (K, "final_layer.*"),
)


def _hydit_block(qkv, mod, t5):     # attn1.Wqkv [3h, h]; default_modulation.1 [h, c]; mlp_t5.0 [., t5]
    h = qkv[1]
    return _mat(qkv, 3 * h, h) and _mat(mod, h) and _mat(t5)


HUNYUAN_DIT = _preset(
    "hunyuan_dit", "HunyuanDiT 1.x (ComfyUI names): attention and MLP in FP8, T5 projection, modulation and final "
                   "layer kept",
    _Architecture((
        _Signature(r"blocks\.(?P<i>\d+)\.attn1\.Wqkv\.weight",
                   ("blocks.{i}.default_modulation.1.weight", "mlp_t5.0.weight"), _hydit_block, _HYDIT_RULES),
    )),
    detection=("ComfyUI names: blocks.N.attn1.Wqkv [3h,h] with blocks.N.default_modulation.1 [h,c] and mlp_t5.0 "
               "under one prefix (ComfyUI keys on mlp_t5.0)"),
    quantizes=(("attn1 Wqkv/out_proj, attn2 q_proj/kv_proj/out_proj", WHY_ATTN),
               ("mlp fc1, fc2, skip_linear (the long skips of the second half)", WHY_BULK)),
    keeps=(("blocks.N.default_modulation", "the only path of the timestep, pooled text and size/style conditions "
            "into each block; [h,h], about 3% of the weights"),
           ("mlp_t5.* (the T5 states' projection), pooler.* (CLIP attention pool)", WHY_TEXT_INPUT),
           ("x_embedder (conv), t_embedder, extra_embedder, style_embedder", _WHY_EMBED),
           ("final_layer.linear, final_layer.adaLN_modulation", _WHY_FINAL),
           ("text_embedding_padding, norms, biases", _WHY_NORMS)),
    reference=("No peer keep list for HunyuanDiT; keeps what the peer survey lists as sensitive (mlp_t5, "
               "final_layer, default_modulation)."),
    attention="blocks.N.attn1.Wqkv/out_proj, attn2.q_proj/kv_proj/out_proj",
    variant=lambda infos, root: "HunyuanDiT",
)
