"""Presets for the non-image families ComfyUI runs, under its names: Hunyuan3D 2.0 (shape generation, FLUX-like
blocks) and ACE-Step 1.0 / 1.5 (music).

Both were taken for another family before (Hunyuan3D for FLUX.1, ACE-Step 1.5 for an LLM); these presets
register after the diffusion presets and before the encoders, and FLUX.1's signature now refuses a root
holding Hunyuan3D's ``latent_in``.
"""
from __future__ import annotations

from .base import _WHY_NORMS, K, Q, _Architecture, _mat, _preset, _Signature
from .diffusion import _FLUX_BFL_RULES, _FLUX_MOD_FLAGS, _WHY_EMBED, _WHY_FINAL, _why_modulation
from .video import WHY_ATTN, WHY_BULK, WHY_GLOBAL_MODULATION, WHY_PEER_MOD

# ----------------------------------------------------------------------------- Hunyuan3D 2.0

_HUNYUAN3D_RULES = _FLUX_BFL_RULES + ((K, "latent_in"), (K, "cond_in"))


def _hunyuan3d(qkv, mod, latent_in):   # img_attn.qkv [3h, h]; img_mod.lin [6h, h]; latent_in [h, c]
    h = qkv[1]
    return _mat(qkv, 3 * h, h) and _mat(mod, 6 * h, h) and _mat(latent_in, h)


HUNYUAN3D = _preset(
    "hunyuan3d", "Hunyuan3D 2.0 shape DiT (ComfyUI names, FLUX-like blocks): attention, MLP and modulation in FP8",
    _Architecture((
        _Signature(r"double_blocks\.(?P<i>\d+)\.img_attn\.qkv\.weight",
                   ("double_blocks.{i}.img_mod.lin.weight", "latent_in.weight"), _hunyuan3d, _HUNYUAN3D_RULES),
        _Signature(r"single_blocks\.(?P<i>\d+)\.linear1\.weight", ("latent_in.weight",),
                   lambda lin1, latent_in: _mat(lin1, None, latent_in[0]), _HUNYUAN3D_RULES),
    )),
    detection=("FLUX.1's blocks (double_blocks.N.img_attn.qkv [3h,h] with img_mod.lin [6h,h], or single_blocks.N."
               "linear1) beside latent_in [h,c] under one prefix (ComfyUI's own marker for Hunyuan3D 2.0, which "
               "the flux preset now refuses)"),
    quantizes=(("img_attn/txt_attn qkv and proj", WHY_ATTN),
               ("img_mlp/txt_mlp, single blocks' linear1/linear2", WHY_BULK),
               ("per-block img_mod.lin, txt_mod.lin, modulation.lin", WHY_PEER_MOD + _why_modulation(
                   "the flux preset's choice, as no Hunyuan3D FP8 keep list was found", "about 27% of the block "
                   "weights", *_FLUX_MOD_FLAGS[:1]))),
    keeps=(("latent_in, cond_in (the shape latent and image-condition input projections), time_in, guidance_in",
            _WHY_EMBED),
           ("final_layer.linear, final_layer.adaLN_modulation", _WHY_FINAL),
           ("norms, biases", _WHY_NORMS)),
    reference=("No peer keep list for Hunyuan3D; the flux preset's rules, with its latent_in/cond_in inputs kept. "
               "Before this preset, `auto` took Hunyuan3D for FLUX.1 and made the same decisions by luck."),
    attention="double_blocks.N.img_attn.qkv/proj, txt_attn.qkv/proj",
    variant=lambda infos, root: "Hunyuan3D 2.0",
)


# ----------------------------------------------------------------------------- ACE-Step 1.0 / 1.5

_ACE1_RULES = (
    (Q, r"re:transformer_blocks\.\d+\.(attn|cross_attn)\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|"
        r"add_v_proj|to_add_out)\.weight"),
    (Q, r"re:lyric_encoder\.encoders\.\d+\.self_attn\.(linear_q|linear_k|linear_v|linear_out|linear_pos)\.weight"),
    (Q, r"re:lyric_encoder\.encoders\.\d+\.(feed_forward|feed_forward_macaron)\.(w_1|w_2)\.weight"),
    (K, "timestep_embedder.*"), (K, "t_block.*"), (K, "speaker_embedder"), (K, "genre_embedder"),
    (K, "lyric_embs"), (K, "lyric_proj"), (K, "lyric_encoder.embed.*"), (K, "projectors.*"), (K, "proj_in.*"),
    (K, "final_layer.*"),
)
_ACE15_LAYERS = r"re:(decoder|encoder\.lyric_encoder|encoder\.timbre_encoder|tokenizer\.attention_pooler|detokenizer)"
_ACE15_RULES = (
    (Q, _ACE15_LAYERS + r"\.layers\.\d+\.(self_attn|cross_attn)\.(q_proj|k_proj|v_proj|o_proj)\.weight"),
    (Q, _ACE15_LAYERS + r"\.layers\.\d+\.mlp\.(gate_proj|up_proj|down_proj)\.weight"),
    (K, "decoder.time_embed.*"), (K, "decoder.time_embed_r.*"), (K, "decoder.condition_embedder"),
    (K, "decoder.proj_in.*"), (K, "decoder.proj_out.*"), (K, "encoder.text_projector"), (K, "*embed_tokens"),
    (K, "tokenizer.audio_acoustic_proj"), (K, "tokenizer.quantizer.*"), (K, "detokenizer.proj_out"),
)


def _ace1_block(add_k, genre):      # cross_attn.add_k_proj [h, h]; genre_embedder [h, g]
    return _mat(add_k, add_k[1], add_k[1]) and _mat(genre, add_k[1])


def _ace15_block(q, norm, cond):    # cross_attn.q_proj [., h]; cross_attn_norm [h]; condition_embedder [h, c]
    return _mat(q, None, cond[0]) and norm == (cond[0],) and _mat(cond)


ACE_STEP = _preset(
    "ace_step", "ACE-Step 1.0 / 1.5 music DiT (ComfyUI names): attention and MLP in FP8, time embedders and "
                "input/output projections kept",
    _Architecture((
        _Signature(r"transformer_blocks\.(?P<i>\d+)\.cross_attn\.add_k_proj\.weight", ("genre_embedder.weight",),
                   _ace1_block, _ACE1_RULES),
        _Signature(r"decoder\.layers\.(?P<i>\d+)\.cross_attn\.q_proj\.weight",
                   ("decoder.layers.{i}.cross_attn_norm.weight", "decoder.condition_embedder.weight"),
                   _ace15_block, _ACE15_RULES),
    )),
    detection=("1.0: transformer_blocks.N.cross_attn.add_k_proj [h,h] with genre_embedder [h,g] (ComfyUI's marker); "
               "1.5: decoder.layers.N.cross_attn.q_proj with cross_attn_norm and decoder.condition_embedder under "
               "one prefix. 1.5's lyric/timbre encoders are Qwen3-like stacks that the llm preset used to claim"),
    quantizes=(("attention: 1.0 attn/cross_attn to_q/k/v/out, add_*_proj, to_add_out and the lyric encoder's "
                "linear_q/k/v/out/pos; 1.5 self_attn/cross_attn q/k/v/o_proj of the decoder and encoders",
                WHY_ATTN),
               ("MLPs: 1.0 lyric encoder feed_forward w_1/w_2 (its DiT's feed-forward is convolutions, kept); "
                "1.5 mlp gate/up/down_proj", WHY_BULK)),
    keeps=(("1.0 t_block; 1.5 time_embed.time_proj, time_embed_r", WHY_GLOBAL_MODULATION),
           ("timestep_embedder, speaker/genre embedders, lyric_embs, lyric_proj, condition_embedder, "
            "text_projector, embed_tokens, proj_in (1.0: convolutions)", _WHY_EMBED),
           ("final_layer (1.0), decoder.proj_out, detokenizer.proj_out (1.5)", _WHY_FINAL),
           ("1.5 tokenizer.quantizer, audio_acoustic_proj", "the audio codes' quantizer projections: tiny, and "
            "their error shifts every code"),
           ("projectors.* (1.0's SSL projectors)", "training heads, tiny"),
           ("scale_shift_table, norms, biases", _WHY_NORMS)),
    reference=("No peer keeps a list for ACE-Step; this follows the DiT presets (embedders, global modulation and "
               "output layers kept, attention and MLPs quantized). ACE-Step 1.5 used to be read as an LLM."),
    attention="1.0: transformer_blocks.N.attn/cross_attn to_q/k/v, to_out.0, add_q/k/v_proj, to_add_out; 1.5: "
              "layers.N.self_attn/cross_attn q/k/v/o_proj",
    variant=lambda infos, root: ("ACE-Step 1.5" if root + "decoder.condition_embedder.weight" in infos
                                 else "ACE-Step 1.0"),
    owns_nested=True,
)
