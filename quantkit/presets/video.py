"""Video diffusion presets under ComfyUI's names: Wan 2.1/2.2, HunyuanVideo 1.0/1.5, LTX-Video / LTX-2,
Cosmos 1.0 / Predict2, Kandinsky 5 and Mochi.

Each registers itself (in this order) through ``_preset``, after the diffusion presets, so that their
detections win first. The keys are the ones ComfyUI's own model classes hold (``comfy/ldm/*``), as in
the fp8_scaled files people publish; how ComfyUI tells the families apart (``comfy/model_detection.py``)
is mirrored in each signature. diffusers-named sources of these families are not recognised here.
"""
from __future__ import annotations

from .base import _WHY_NORMS, K, Q, _Architecture, _mat, _preset, _Signature
from .diffusion import _WHY_EMBED, _WHY_FINAL, _keep_flag, _why_modulation

# Shared reasons of the video and image families (docs/presets.md has the sources).
WHY_GLOBAL_MODULATION = ("the global modulation: one projection of the timestep (and pooled text) whose output "
                         "shifts, scales and gates every block, so its error is coherent over the whole video or "
                         "image; tiny (kept by convert-to-quant's presets and in Comfy-Org's files per the peer "
                         "survey)")
WHY_TEXT_INPUT = ("text/caption input projection or refiner: runs once on the encoder states that every "
                  "cross-attention reads; small, and its error reaches every block")
WHY_ATTN = ("under --recipe compact only (the default, mixed, keeps them): about a third of the block weights, "
            "plain projections whose outputs mostly pass through qk-norms; the published fp8_scaled files (every "
            "nn.Linear in FP8) and convert-to-quant's presets quantize them")
WHY_BULK = "the bulk of the weights: plain linears over normalised activations"
WHY_PEER_MOD = ("per-block modulation like FLUX.1's (the flux preset quantizes it, as Comfy-Org's scaled-FP8 files "
                "do); ")


# ----------------------------------------------------------------------------- Wan 2.1 / 2.2

_WAN_RULES = (
    (Q, r"re:(blocks|vace_blocks)\.\d+\.(self_attn|cross_attn)\.(q|k|v|o|k_img|v_img)\.weight"),
    (Q, r"re:(blocks|vace_blocks)\.\d+\.ffn\.(0|2)\.weight"),
    (K, r"re:vace_blocks\.\d+\.(before_proj|after_proj)"),
    (K, "patch_embedding"), (K, "vace_patch_embedding"), (K, "text_embedding.*"), (K, "time_embedding.*"),
    (K, "time_projection.*"), (K, "head.head"), (K, "img_emb.*"),
)


def _wan_block(q, ffn, head):       # self_attn.q [h, h]; ffn.0 [f, h]; head.head [out * 4, h]
    h = q[1]
    return _mat(q, h, h) and _mat(ffn, None, h) and _mat(head, None, h)


def _wan_variant(infos: dict, root: str) -> str:
    """Wan's variant, as ComfyUI tells it: VACE, TI2V 5B (48 output channels), i2v by CLIP image
    embedding (2.1) or by 36 input channels (2.2 14B), else t2v (2.1 and 2.2 14B share that layout)."""
    patch, head = infos.get(root + "patch_embedding.weight"), infos.get(root + "head.head.weight")
    in_dim = patch.shape[1] if patch is not None and len(patch.shape) > 1 else 0
    out_dim = head.shape[0] // 4 if head is not None else 0
    if patch is None or head is None:
        return "Wan (a shard: the variant shows in the file holding patch_embedding and head)"
    size = {1536: " 1.3B", 5120: " 14B"}.get(head.shape[1], "")
    if root + "vace_patch_embedding.weight" in infos:
        return f"Wan 2.1/2.2{size} VACE"
    if out_dim == 48:
        return "Wan 2.2 5B TI2V"
    if root + "img_emb.proj.0.bias" in infos or root + "img_emb.proj.1.weight" in infos:
        return f"Wan 2.1{size} " + ("FLF2V" if root + "img_emb.emb_pos" in infos else "i2v")
    if in_dim == 36:
        return "Wan 2.2 14B i2v"
    if in_dim == 16:
        return "Wan 2.1 1.3B t2v" if size == " 1.3B" else f"Wan 2.1/2.2{size} t2v"
    return "Wan (other variant)"


WAN = _preset(
    "wan", "Wan 2.1 / 2.2 video transformer (ComfyUI names; t2v, i2v, 5B TI2V, VACE): attention and FFN in FP8",
    _Architecture((
        _Signature(r"blocks\.(?P<i>\d+)\.self_attn\.q\.weight", ("blocks.{i}.ffn.0.weight", "head.head.weight"),
                   _wan_block, _WAN_RULES),
        # A shard holding only blocks: the block's own modulation parameter [1, 6, h] instead of the head.
        _Signature(r"blocks\.(?P<i>\d+)\.self_attn\.q\.weight", ("blocks.{i}.ffn.0.weight", "blocks.{i}.modulation"),
                   lambda q, ffn, mod: _mat(q, q[1], q[1]) and _mat(ffn, None, q[1]) and mod == (1, 6, q[1]),
                   _WAN_RULES),
    )),
    detection=("ComfyUI names: blocks.N.self_attn.q [h,h] with blocks.N.ffn.0 [f,h] and head.head [4*out,h] (or, in "
               "a shard, blocks.N.modulation [1,6,h]) under one prefix (ComfyUI itself keys on head.modulation). "
               "Variant from the keys and shapes: "
               "vace_patch_embedding -> VACE; head.head of 4*48 rows -> 2.2 5B TI2V; img_emb (CLIP image "
               "projection) -> 2.1 i2v (FLF2V with img_emb.emb_pos); patch_embedding with 36 input channels -> "
               "2.2 14B i2v; 16 -> t2v"),
    quantizes=(("self_attn and cross_attn q, k, v, o (and i2v's k_img, v_img), in the VACE blocks too",
                WHY_ATTN),
               ("ffn.0, ffn.2 of every block", WHY_BULK)),
    keeps=(("time_projection.1", WHY_GLOBAL_MODULATION + " (convert-to-quant's WAN_LAYER_KEYNAMES)"),
           ("head.head", _WHY_FINAL + " (WAN_LAYER_KEYNAMES, modelopt and kuantala's proj_out)"),
           ("patch_embedding, vace_patch_embedding (convolutions), text_embedding, time_embedding, img_emb",
            _WHY_EMBED),
           ("vace_blocks.N.before_proj / after_proj", "VACE's entry and exit into the main stream, like a "
            "ControlNet's output projections (zero-initialised, unnormalised residuals); small"),
           ("blocks.N.modulation, head.modulation", "bare parameters (not layer weights): never quantized"),
           ("norms (norm_q/norm_k, norm3), biases", _WHY_NORMS)),
    reference=("convert-to-quant's --wan (WAN_LAYER_KEYNAMES) and the Comfy-Org fp8_scaled Wan files (per the peer "
               "survey; their headers were not inspected here) keep the embedders, time_projection and "
               "head.head and quantize the block linears; this preset does the same. kuantala also keeps blocks "
               "0-2 and 37-39 whole: add --keep 're:blocks\\.(0|1|2|37|38|39)\\..*' to follow it. Under the "
               "default --recipe mixed the attention (about 60% of the block weights) stays BF16; --recipe "
               "compact quantizes it, as the published files do (~half the BF16 size)."),
    attention="blocks.N.self_attn.q/k/v/o, cross_attn.q/k/v/o (+ k_img/v_img for 2.1 i2v), and the same in vace_blocks",
    variant=_wan_variant,
)


# ----------------------------------------------------------------------------- HunyuanVideo 1.0 / 1.5

_HV_MOD_FLAG = _keep_flag(r"re:.*\.(img_mod|txt_mod|modulation)\.lin", "ComfyUI names")
_HUNYUAN_VIDEO_RULES = (
    (Q, r"re:double_blocks\.\d+\.(img_attn|txt_attn)\.(qkv|proj)\.weight"),
    (Q, r"re:double_blocks\.\d+\.(img_mlp|txt_mlp)\.\d+\.weight"),
    (Q, r"re:single_blocks\.\d+\.(linear1|linear2)\.weight"),
    (Q, r"re:double_blocks\.\d+\.(img_mod|txt_mod)\.lin\.weight"),
    (Q, r"re:single_blocks\.\d+\.modulation\.lin\.weight"),
    (K, "img_in.*"), (K, "txt_in.*"), (K, "time_in.*"), (K, "time_r_in.*"), (K, "vector_in.*"),
    (K, "guidance_in.*"), (K, "byt5_in.*"), (K, "vision_in.*"), (K, "cond_type_embedding"), (K, "final_layer.*"),
)


def _hunyuan_video_block(qkv, mod, refiner):   # img_attn.qkv [3h, h], img_mod.lin [6h, h]; a token refiner
    h = qkv[1]
    return _mat(qkv, 3 * h, h) and _mat(mod, 6 * h, h) and len(refiner) == 1


def _hunyuan_video_variant(infos: dict, root: str) -> str:
    """The variant as ComfyUI tells it: HunyuanImage 2.1 by its 2-D patch embedding (its refiner by a
    [1, 1, 1] patch without vector_in), 1.5 by its vision/cond-type inputs (98 input channels: the
    super-resolution model), else 1.0, i2v by 33 input channels (SkyReels: 32)."""
    img_in = infos.get(root + "img_in.proj.weight")
    shape = tuple(img_in.shape) if img_in is not None else ()
    channels = shape[1] if len(shape) > 1 else 0
    if len(shape) == 4:
        return "HunyuanImage 2.1"
    # 1.5 has the refiner's [1, 1, 1] patch too: its vision input tells it first, as in ComfyUI's table.
    if root + "cond_type_embedding.weight" in infos or root + "vision_in.proj.0.weight" in infos:
        return "HunyuanVideo 1.5" + (" super-resolution" if channels == 98 else "")
    if shape[2:] == (1, 1, 1) and root + "vector_in.in_layer.weight" not in infos:
        return "HunyuanImage 2.1 refiner"
    if root + "byt5_in.fc1.weight" in infos:
        return "HunyuanVideo 1.5"
    return "HunyuanVideo 1.0" + {33: " i2v", 32: " i2v (SkyReels)"}.get(channels, "")


HUNYUAN_VIDEO = _preset(
    "hunyuan_video", "HunyuanVideo 1.0 / 1.5 transformer (ComfyUI names): FLUX-like blocks in FP8, embedders, "
                     "token refiner and final layer kept",
    _Architecture((
        _Signature(r"double_blocks\.(?P<i>\d+)\.img_attn\.qkv\.weight",
                   ("double_blocks.{i}.img_mod.lin.weight", "txt_in.individual_token_refiner.blocks.0.norm1.weight"),
                   _hunyuan_video_block, _HUNYUAN_VIDEO_RULES),
    )),
    detection=("ComfyUI names: double_blocks.N.img_attn.qkv [3h,h] with img_mod.lin [6h,h] and the text token "
               "refiner txt_in.individual_token_refiner.blocks.0.norm1 under one prefix (ComfyUI's own marker). "
               "HunyuanImage 2.1 when img_in is a 2-D convolution (its refiner: a [1,1,1] patch without "
               "vector_in); 1.5 when cond_type_embedding, vision_in or byt5_in is present (98 input channels: "
               "super-resolution); i2v when img_in takes 33 channels (SkyReels: 32)"),
    quantizes=(("img_attn/txt_attn qkv and proj", WHY_ATTN),
               ("img_mlp/txt_mlp, single blocks' linear1/linear2", WHY_BULK),
               ("per-block modulation img_mod.lin, txt_mod.lin, modulation.lin",
                WHY_PEER_MOD + _why_modulation("Comfy-Org's HunyuanVideo fp8_scaled files follow the every-nn.Linear "
                                               "rule", "about a quarter of the block weights", _HV_MOD_FLAG))),
    keeps=(("final_layer.linear, final_layer.adaLN_modulation", _WHY_FINAL),
           ("txt_in.* (input_embedder, t/c_embedder and the individual_token_refiner blocks)", WHY_TEXT_INPUT),
           ("img_in (conv), time_in, time_r_in, vector_in, guidance_in, byt5_in, vision_in, cond_type_embedding",
            _WHY_EMBED),
           ("norms, biases", _WHY_NORMS)),
    reference=("convert-to-quant's --hunyuan (1.5) keeps only norms, img_in, vision_in and cond_type_embedding, so "
               "its final layer and token refiner are FP8; this preset keeps them too (under 2% of the weights). "
               "Per-block modulation is quantized as the flux preset does; add " + _HV_MOD_FLAG + " to keep it."),
    attention="double_blocks.N.img_attn.qkv/proj, txt_attn.qkv/proj; single blocks' linear1/linear2 join attention "
              "with the MLP and are quantized as MLP",
    variant=_hunyuan_video_variant,
)


# ----------------------------------------------------------------------------- LTX-Video / LTX-2

_LTX_ATTN = r"(attn1|attn2|audio_attn1|audio_attn2|audio_to_video_attn|video_to_audio_attn)"
_LTXV_RULES = (
    (Q, r"re:transformer_blocks\.\d+\." + _LTX_ATTN + r"\.(to_q|to_k|to_v|to_out\.0)\.weight"),
    (Q, r"re:transformer_blocks\.\d+\.(ff|audio_ff)\.net\.(0\.proj|2)\.weight"),
    (K, "patchify_proj"), (K, "audio_patchify_proj"), (K, "proj_out"), (K, "audio_proj_out"),
    (K, r"re:(\w+_)?adaln_single\..*"), (K, "caption_projection.*"), (K, "audio_caption_projection.*"),
    (K, r"re:\w*embeddings_connector\..*"),
)


def _ltxv_block(q, k2, adaln):      # attn1.to_q [h, h]; attn2.to_k [h, c]; adaln_single.linear [6h or 9h, h]
    h = q[1]
    return _mat(q, h, h) and _mat(k2, h) and _mat(adaln, None, h) and adaln[0] % h == 0


def _ltxv_variant(infos: dict, root: str) -> str:
    return "LTX-2 (audio-video)" if root + "audio_adaln_single.linear.weight" in infos else "LTX-Video"


LTXV = _preset(
    "ltxv", "LTX-Video and LTX-2 (audio-video) transformer (ComfyUI names): attention and FFN in FP8, "
            "adaln_single and the input/output projections kept",
    _Architecture((
        _Signature(r"transformer_blocks\.(?P<i>\d+)\.attn1\.to_q\.weight",
                   ("transformer_blocks.{i}.attn2.to_k.weight", "adaln_single.linear.weight"),
                   _ltxv_block, _LTXV_RULES),
    )),
    detection=("ComfyUI names: transformer_blocks.N.attn1.to_q [h,h] with attn2.to_k [h,c] and adaln_single.linear "
               "[kh,h] under one prefix (ComfyUI keys on adaln_single's timestep embedder). LTX-2 (audio-video) "
               "when audio_adaln_single.linear is present"),
    quantizes=(("attn1/attn2 (and LTX-2's audio_attn1/2, audio_to_video_attn, video_to_audio_attn) to_q/k/v, "
                "to_out.0", WHY_ATTN),
               ("ff / audio_ff net.0.proj, net.2", WHY_BULK)),
    keeps=(("adaln_single.*, audio_adaln_single.*, av_ca_*_adaln_single.*", WHY_GLOBAL_MODULATION),
           ("patchify_proj, audio_patchify_proj", _WHY_EMBED),
           ("proj_out, audio_proj_out", _WHY_FINAL),
           ("caption_projection, audio_caption_projection, *_embeddings_connector.* (LTX-2's text connectors)",
            WHY_TEXT_INPUT),
           ("scale_shift_table (per block and final)", "bare parameters: never quantized"),
           ("norms, biases", _WHY_NORMS)),
    reference=("convert-to-quant's LTXV2_LAYER_KEYNAMES keeps all of the above and also blocks 0, 1, 46 and 47 "
               "whole; this preset quantizes every block (add --keep 're:transformer_blocks\\.(0|1|46|47)\\..*' to "
               "follow it)."),
    attention="transformer_blocks.N.attn1/attn2 (and the audio and cross-modal attentions) to_q/k/v, to_out.0",
    variant=_ltxv_variant,
)


# ----------------------------------------------------------------------------- Cosmos 1.0 / Predict2

_COSMOS1_RULES = (
    (Q, r"re:blocks\.block\d+\.blocks\.\d+\.block\.attn\.(to_q|to_k|to_v|to_out)\.0\.weight"),
    (Q, r"re:blocks\.block\d+\.blocks\.\d+\.block\.(layer1|layer2)\.weight"),
    (K, r"re:blocks\.block\d+\.blocks\.\d+\.adaLN_modulation\..*"),
    (K, "x_embedder.*"), (K, "t_embedder.*"), (K, "extra_pos_embedder.*"), (K, "final_layer.*"),
)
_COSMOS2_RULES = (
    (Q, r"re:blocks\.\d+\.(self_attn|cross_attn)\.(q_proj|k_proj|v_proj|output_proj)\.weight"),
    (Q, r"re:blocks\.\d+\.mlp\.(layer1|layer2)\.weight"),
    (K, r"re:blocks\.\d+\.adaln_modulation_(self_attn|cross_attn|mlp)\..*"),
    (K, "x_embedder.*"), (K, "t_embedder.*"), (K, "extra_pos_embedder.*"), (K, "final_layer.*"),
    (K, "llm_adapter.*"),
)


def _cosmos1_block(q, lora):        # block.attn.to_q.0 [h, h]; adaLN_modulation.1 [lora, h]
    return _mat(q, q[1], q[1]) and _mat(lora, None, q[1])


def _cosmos2_block(mlp, lora, q):   # mlp.layer1 [f, h]; adaln_modulation_self_attn.1 [lora, h]; q_proj [h, h]
    h = mlp[1]
    return _mat(lora, None, h) and _mat(q, h, h)


def _cosmos_variant(infos: dict, root: str) -> str:
    """1.0 or Predict2 (Anima with an LLM adapter); i2v as ComfyUI tells it: 17 latent channels in
    x_embedder.proj.1, whose input is (channels + the padding mask) x a 2x2x1 patch."""
    emb = infos.get(root + "x_embedder.proj.1.weight")
    i2v = " i2v" if emb is not None and len(emb.shape) == 2 and emb.shape[1] // 4 - 1 == 17 else ""
    if any(k.startswith(root + "blocks.block") for k in infos):
        return "Cosmos 1.0" + i2v
    return "Cosmos Predict2 (Anima)" if root + "llm_adapter.blocks.0.cross_attn.q_proj.weight" in infos \
        else "Cosmos Predict2" + i2v


COSMOS = _preset(
    "cosmos", "NVIDIA Cosmos 1.0 and Predict2 video/image transformer (ComfyUI names): attention and MLP in FP8, "
              "AdaLN-LoRA modulation kept",
    _Architecture((
        _Signature(r"blocks\.block(?P<i>\d+)\.blocks\.0\.block\.attn\.to_q\.0\.weight",
                   ("blocks.block{i}.blocks.0.adaLN_modulation.1.weight",), _cosmos1_block, _COSMOS1_RULES),
        _Signature(r"blocks\.(?P<i>\d+)\.mlp\.layer1\.weight",
                   ("blocks.{i}.adaln_modulation_self_attn.1.weight", "blocks.{i}.self_attn.q_proj.weight"),
                   _cosmos2_block, _COSMOS2_RULES),
    )),
    detection=("Cosmos 1.0: blocks.blockN.blocks.0.block.attn.to_q.0 [h,h] with blocks.blockN.blocks.0."
               "adaLN_modulation.1 [lora,h]; Predict2: blocks.N.mlp.layer1 [f,h] with "
               "adaln_modulation_self_attn.1 [lora,h] and self_attn.q_proj [h,h] (ComfyUI's own markers); "
               "Anima (Predict2 with an LLM adapter) when llm_adapter.* is present; i2v when x_embedder.proj.1 reads 17 "
               "latent channels (ComfyUI's marker)"),
    quantizes=(("attention q/k/v/out (1.0: attn.to_q.0 ...; Predict2: self_attn/cross_attn q/k/v/output_proj)",
                WHY_ATTN),
               ("MLP layer1, layer2", WHY_BULK)),
    keeps=(("per-block AdaLN-LoRA (adaLN_modulation.1/.2; Predict2's adaln_modulation_self_attn/cross_attn/mlp)",
            "modulation through a rank-256 bottleneck: about 3% of the block weights, and every token of its "
            "sub-block reads its output; kept whole (the generic policy kept the _attn ones as attention and "
            "quantized the _mlp one, an accident of their names)"),
           ("x_embedder, t_embedder, extra_pos_embedder, llm_adapter (Anima)", _WHY_EMBED),
           ("final_layer.linear and its adaLN modulation", _WHY_FINAL),
           ("norms (affline_norm, t_embedding_norm, q/k norms), biases", _WHY_NORMS)),
    reference=("No peer publishes a Cosmos keep list; this keeps what the other DiT presets keep (embedders, final "
               "layer) and the small AdaLN-LoRA modulation (cheap, unlike FLUX's full-rank one)."),
    attention="1.0: blocks.blockN.blocks.M.block.attn.to_q/to_k/to_v/to_out; Predict2: blocks.N.self_attn/cross_attn "
              "q_proj/k_proj/v_proj/output_proj",
    variant=_cosmos_variant,
)


# ----------------------------------------------------------------------------- Kandinsky 5

_K5_MOD_FLAG = _keep_flag(r"re:.*_transformer_blocks\.\d+\.(text|visual)_modulation\..*", "ComfyUI names")
_KANDINSKY5_RULES = (
    (Q, r"re:(text|visual)_transformer_blocks\.\d+\.(self_attention|cross_attention)\."
        r"(to_query|to_key|to_value|out_layer)\.weight"),
    (Q, r"re:(text|visual)_transformer_blocks\.\d+\.feed_forward\.(in_layer|out_layer)\.weight"),
    (Q, r"re:(text|visual)_transformer_blocks\.\d+\.(text|visual)_modulation\.out_layer\.weight"),
    (K, "time_embeddings.*"), (K, "text_embeddings.*"), (K, "pooled_text_embeddings.*"), (K, "visual_embeddings.*"),
    (K, "out_layer.*"),
)


def _kandinsky5_block(q, mod):      # cross_attention.to_query [h, h]; visual_modulation.out_layer [9h, t]
    h = q[1]
    return _mat(q, h, h) and _mat(mod) and mod[0] == 9 * h


def _kandinsky5_variant(infos: dict, root: str) -> str:
    """The size, as ComfyUI tells it from the model width: 1792 Lite video, 2560 Lite image, 4096 Pro."""
    emb = infos.get(root + "visual_embeddings.in_layer.weight")
    width = emb.shape[0] if emb is not None else 0
    return "Kandinsky 5" + {1792: " Lite (video)", 2560: " Lite (image)", 4096: " Pro"}.get(width, "")


KANDINSKY5 = _preset(
    "kandinsky5", "Kandinsky 5 video/image transformer (ComfyUI names): attention, FFN and per-block modulation "
                  "in FP8",
    _Architecture((
        _Signature(r"visual_transformer_blocks\.(?P<i>\d+)\.cross_attention\.to_query\.weight",
                   ("visual_transformer_blocks.{i}.visual_modulation.out_layer.weight",),
                   _kandinsky5_block, _KANDINSKY5_RULES),
    )),
    detection=("ComfyUI names: visual_transformer_blocks.N.cross_attention.to_query [h,h] with "
               "visual_modulation.out_layer [9h,t] under one prefix (ComfyUI keys on cross_attention.key_norm)"),
    quantizes=(("self_attention/cross_attention to_query/key/value, out_layer", WHY_ATTN),
               ("feed_forward in_layer, out_layer", WHY_BULK),
               ("per-block text_modulation / visual_modulation.out_layer",
                WHY_PEER_MOD + _why_modulation("no published FP8 Kandinsky 5 file with a layer list was found",
                                               "about 10% of the block weights", _K5_MOD_FLAG))),
    keeps=(("out_layer.out_layer, out_layer.modulation", _WHY_FINAL),
           ("time_embeddings, text_embeddings, pooled_text_embeddings, visual_embeddings", _WHY_EMBED),
           ("norms, biases", _WHY_NORMS)),
    reference=("No peer keep list for Kandinsky 5; the final layer and the embedders are kept as in every DiT "
               "preset, per-block modulation quantized as in the flux preset (add " + _K5_MOD_FLAG + " to keep it)."),
    attention="text_/visual_transformer_blocks.N.self_attention and cross_attention to_query/to_key/to_value/out_layer",
    variant=_kandinsky5_variant,
)


# ----------------------------------------------------------------------------- Mochi

_MOCHI_MOD_FLAG = _keep_flag(r"re:.*blocks\.\d+\.(mod_x|mod_y)", "ComfyUI names")
_MOCHI_RULES = (
    (Q, r"re:blocks\.\d+\.attn\.(qkv_x|qkv_y|proj_x|proj_y)\.weight"),
    (Q, r"re:blocks\.\d+\.(mlp_x|mlp_y)\.(w1|w2)\.weight"),
    (Q, r"re:blocks\.\d+\.(mod_x|mod_y)\.weight"),
    (K, "x_embedder.*"), (K, "t_embedder.*"), (K, "t5_y_embedder.*"), (K, "t5_yproj"), (K, "final_layer.*"),
)


def _mochi_block(qkv, mod, t5_yproj):   # attn.qkv_x [3h, h]; mod_x [4h, h]; t5_yproj a matrix
    h = qkv[1]
    return _mat(qkv, 3 * h, h) and _mat(mod, 4 * h, h) and _mat(t5_yproj)


MOCHI = _preset(
    "mochi", "Genmo Mochi 1 video transformer (ComfyUI names): attention, MLP and per-block modulation in FP8",
    _Architecture((
        _Signature(r"blocks\.(?P<i>\d+)\.attn\.qkv_x\.weight", ("blocks.{i}.mod_x.weight", "t5_yproj.weight"),
                   _mochi_block, _MOCHI_RULES),
    )),
    detection=("ComfyUI names: blocks.N.attn.qkv_x [3h,h] with blocks.N.mod_x [4h,h] and t5_yproj under one prefix "
               "(ComfyUI keys on t5_yproj)"),
    quantizes=(("attn.qkv_x, qkv_y, proj_x, proj_y", WHY_ATTN),
               ("mlp_x / mlp_y w1, w2", WHY_BULK),
               ("per-block mod_x, mod_y", WHY_PEER_MOD + _why_modulation(
                   "Comfy-Org's Mochi fp8_scaled file follows the every-nn.Linear rule", "a few % of the weights",
                   _MOCHI_MOD_FLAG))),
    keeps=(("x_embedder (conv), t_embedder, t5_y_embedder (attention pool), t5_yproj", _WHY_EMBED),
           ("final_layer.mod, final_layer.linear", _WHY_FINAL),
           ("norms, biases", _WHY_NORMS)),
    reference=("No peer keep list for Mochi; embedders and final layer kept as in every DiT preset."),
    attention="blocks.N.attn.qkv_x/qkv_y/proj_x/proj_y",
    variant=lambda infos, root: "Mochi 1",
)
