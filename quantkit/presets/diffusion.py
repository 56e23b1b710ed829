"""Diffusion presets: FLUX.1, FLUX ControlNet, SD3 / SD3.5, Qwen-Image and the SD1.x / SD2.x / SDXL UNet.

Each registers itself (in this order) through ``_preset``; the machinery is in ``__init__``.
"""
from __future__ import annotations

from ..policy import Action
from .base import Q_EVERY_RECIPE, _WHY_NORMS, K, Q, _Architecture, _mat, _preset, _Signature


# ----------------------------------------------------------------------------- shared reasons (diffusion)
# Sources behind these sentences: docs/presets.md.

# The --keep patterns that undo the modulation rules below, for any prefix; quoted in the presets'
# texts and docs, and checked against real key lists in tests/test_presets.py.
KEEP_MODULATION_BFL = r"re:.*\.(img_mod|txt_mod|modulation)\.lin"
KEEP_MODULATION_DIFFUSERS = r"re:.*blocks\.\d+\.(norm1|norm1_context|norm)\.linear"
KEEP_MODULATION_MMDIT = r"re:.*joint_blocks\.\d+\.(x_block|context_block)\.adaLN_modulation\.1"


def _keep_flag(pattern: str, names: str) -> str:
    return f"--keep '{pattern}' ({names})"


def _why_modulation(releases: str, share: str, *flags: str) -> str:
    """Why a preset quantizes the per-block AdaLN modulation, the caveat, and the --keep that undoes it."""
    return (f"{releases}, and it is {share}. Caveat: it is one small matmul per step on the timestep/pooled "
            "vector, so FP8 saves memory but no compute, and its output shifts, scales and gates every token, so "
            "its error is coherent across the whole image instead of averaging out; tools that single out "
            "sensitive layers keep it in some DiTs (convert-to-quant: FLUX.2 stream_modulation, Z-Image "
            "adaLN_modulation; comfy-quants and convert-to-quant: Qwen-Image block 0 img_mod). If you see colour "
            "or contrast drift, keep it in BF16 with " + " or ".join(flags))


_FLUX_MOD_RELEASES = ("every published FP8 release of FLUX.1 quantizes it (Comfy-Org's scaled-FP8 files, which "
                      "convert every nn.Linear; flux-fp8-api by default; modelopt's FLUX-dev recipe)")
_FLUX_MOD_FLAGS = (_keep_flag(KEEP_MODULATION_BFL, "BFL names"),
                   _keep_flag(KEEP_MODULATION_DIFFUSERS, "diffusers names"))
_SD3_MOD_FLAGS = (_keep_flag(KEEP_MODULATION_DIFFUSERS, "diffusers names"),
                  _keep_flag(KEEP_MODULATION_MMDIT, "ComfyUI/SAI names"))

_WHY_EMBED = ("input projections and timestep/guidance/text embedders: run once per step on the raw inputs, "
              "tiny, and every later layer inherits their error (kept by modelopt, kuantala and the "
              "convert-to-quant presets)")
_WHY_FINAL = ("final layer (norm_out modulation and output projection): its error lands directly on the "
              "predicted noise/velocity; tiny (kept by modelopt's FLUX recipe, kuantala and flux-fp8-api)")
_WHY_DIT_ATTN = ("the generic policy keeps attention because it does not know the architecture; here the "
                 "q/k/v outputs pass through RMS qk-norms that absorb a scale error, they are about a third of "
                 "the block weights, and every FP8 release of this family quantizes them (Comfy-Org's "
                 "scaled-FP8 files, flux-fp8-api, modelopt)")

_ATTN_DIFFUSERS = r"(to_q|to_k|to_v|to_qkv|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_added_qkv|to_add_out)"


# ----------------------------------------------------------------------------- FLUX.1

_FLUX_BFL_DOUBLE_RULES = (
    (Q, r"re:double_blocks\.\d+\.(img_attn|txt_attn)\.(qkv|proj)\.weight"),
    (Q, r"re:double_blocks\.\d+\.(img_mlp|txt_mlp)\.\d+\.weight"),
    (Q, r"re:double_blocks\.\d+\.(img_mod|txt_mod)\.lin\.weight"),
    (K, "img_in"), (K, "txt_in"), (K, "time_in.*"), (K, "vector_in.*"), (K, "guidance_in.*"),
)
_FLUX_BFL_RULES = _FLUX_BFL_DOUBLE_RULES + (
    (Q, r"re:single_blocks\.\d+\.(linear1|linear2)\.weight"),
    (Q, r"re:single_blocks\.\d+\.modulation\.lin\.weight"),
    (K, "final_layer.*"),
)
_FLUX_DIFFUSERS_BLOCK_RULES = (
    (Q, r"re:transformer_blocks\.\d+\.attn\." + _ATTN_DIFFUSERS + r"\.weight"),
    (Q, r"re:transformer_blocks\.\d+\.(ff|ff_context)\.net\.(0\.proj|2)\.weight"),
    # Quantized in every recipe: BFL's names join these with proj_mlp into linear1 (see docs/presets.md).
    (Q_EVERY_RECIPE, r"re:single_transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_qkv)\.weight"),
    (Q, r"re:single_transformer_blocks\.\d+\.(proj_mlp|proj_out)\.weight"),
    (Q, r"re:transformer_blocks\.\d+\.(norm1|norm1_context)\.linear\.weight"),
    (Q, r"re:single_transformer_blocks\.\d+\.norm\.linear\.weight"),
    (K, "x_embedder"), (K, "context_embedder"), (K, "time_text_embed.*"),
)
_FLUX_DIFFUSERS_RULES = _FLUX_DIFFUSERS_BLOCK_RULES + ((K, "norm_out.*"), (K, "proj_out"))


def _flux_double(qkv, mod):                # BFL: img_attn.qkv [3h, h], img_mod.lin [6h, h]
    h = qkv[1]
    return _mat(qkv, 3 * h, h) and _mat(mod, 6 * h, h)


def _flux_single(lin1, mod):               # BFL: linear1 [3h + mlp, h], modulation.lin [3h, h]
    h = lin1[1]
    return _mat(lin1, None, h) and lin1[0] > 3 * h and _mat(mod, 3 * h, h)


def _flux_diffusers_single(mlp, norm, q):  # proj_mlp [mlp, h], norm.linear [3h, h], attn.to_q [h, h]
    h = mlp[1]
    return _mat(mlp, None, h) and _mat(norm, 3 * h, h) and _mat(q, h, h)


def _flux_diffusers_double(norm1, norm1c, x_emb):   # norm1(_context).linear [6h, h]; x_embedder a matrix
    h = norm1[1]
    return _mat(norm1, 6 * h, h) and _mat(norm1c, 6 * h, h) and _mat(x_emb, h)


FLUX = _preset(
    "flux", "FLUX.1 transformer (BFL/ComfyUI or diffusers names): attention, MLP and modulation linears of "
            "every block in FP8",
    _Architecture((
        _Signature(r"double_blocks\.(?P<i>\d+)\.img_attn\.qkv\.weight", ("double_blocks.{i}.img_mod.lin.weight",),
                   _flux_double, _FLUX_BFL_RULES),
        _Signature(r"single_blocks\.(?P<i>\d+)\.linear1\.weight", ("single_blocks.{i}.modulation.lin.weight",),
                   _flux_single, _FLUX_BFL_RULES),
        _Signature(r"single_transformer_blocks\.(?P<i>\d+)\.proj_mlp\.weight",
                   ("single_transformer_blocks.{i}.norm.linear.weight",
                    "single_transformer_blocks.{i}.attn.to_q.weight"),
                   _flux_diffusers_single, _FLUX_DIFFUSERS_RULES),
        _Signature(r"transformer_blocks\.(?P<i>\d+)\.norm1\.linear\.weight",
                   ("transformer_blocks.{i}.norm1_context.linear.weight", "x_embedder.weight"),
                   _flux_diffusers_double, _FLUX_DIFFUSERS_RULES),
    ),
        # ControlNets; Hunyuan3D 2.0 (latent_in); HunyuanVideo, whose blocks are FLUX's (its x_embedder is a
        # conv, its text embedder a token refiner). Chroma and FLUX.2 have no per-block modulation, so no
        # signature matches them.
        absent=(r"controlnet_.*", r"x_embedder\.proj\..*", r"context_embedder\.token_refiner\..*",
                r"txt_in\.individual_token_refiner\..*", r"latent_in\..*")),
    detection=("BFL/ComfyUI names: double_blocks.N.img_attn.qkv [3h,h] with img_mod.lin [6h,h], or "
               "single_blocks.N.linear1 [3h+mlp,h] with modulation.lin [3h,h]; diffusers names: "
               "single_transformer_blocks.N.proj_mlp [mlp,h] with norm.linear [3h,h] and attn.to_q [h,h], or "
               "transformer_blocks.N.norm1.linear and norm1_context.linear [6h,h] with a matrix x_embedder. "
               "Not when controlnet_* keys, HunyuanVideo's token refiner, Hunyuan3D's latent_in or a conv "
               "x_embedder.proj share the prefix"),
    quantizes=(("attention: img_attn/txt_attn qkv and proj (to_q/k/v, to_out.0, add_q/k/v_proj, to_add_out; "
                "single blocks' to_q/k/v)", _WHY_DIT_ATTN),
               ("MLPs: img_mlp/txt_mlp (ff, ff_context), single blocks' linear1/linear2 (proj_mlp, proj_out)",
                "the bulk of the weights; linears the generic policy quantizes as well"),
               ("AdaLN modulation of every block: img_mod.lin, txt_mod.lin, modulation.lin (norm1.linear, "
                "norm1_context.linear, norm.linear)",
                _why_modulation(_FLUX_MOD_RELEASES, "about 27% of the block weights (3.2B of FLUX.1's 11.9B "
                                "parameters): ~12 GB instead of ~15 GB", *_FLUX_MOD_FLAGS))),
    keeps=(("img_in, txt_in, time_in, vector_in, guidance_in (x_embedder, context_embedder, time_text_embed)",
            _WHY_EMBED),
           ("final_layer.linear, final_layer.adaLN_modulation (proj_out, norm_out.linear)", _WHY_FINAL),
           ("norms (query_norm/key_norm scales; norm_q/norm_k, norm_added_q/k), biases", _WHY_NORMS)),
    reference=("Comfy-Org's legacy scaled-FP8 FLUX files quantize every nn.Linear, final_layer.linear included "
               "(its scale_weight shows in load logs); flux-fp8-api quantizes every block linear, modulation "
               "included (opt-out flag), but not final_layer and by default not the embedders; modelopt's "
               "FLUX-dev recipe keeps proj_out, x_embedder, context_embedder, time_text_embed and norm_out and "
               "quantizes the rest, modulation included. Like all three, this preset quantizes the per-block "
               "modulation (FLUX.1-dev comes to ~12 GB from 23.8 GB in BF16); like modelopt it keeps the "
               "embedders and the final layer (under 0.1B parameters). Add " + " or ".join(_FLUX_MOD_FLAGS) +
               " to keep the modulation in BF16 (+~3 GB for FLUX.1). The exact layer list of Comfy-Org's "
               "flux1-dev-fp8 file could not be inspected."),
    attention="double blocks: img_attn.qkv, img_attn.proj, txt_attn.qkv, txt_attn.proj (diffusers: attn.to_q/k/v, to_out.0, add_q/k/v_proj, to_add_out); single blocks: attn.to_q/k/v under diffusers names only -- BFL's linear1/linear2 join them with the MLP and stay FP8 in both recipes (docs/presets.md)",
)


# ----------------------------------------------------------------------------- FLUX ControlNet

_CONTROLNET_KEEPS = ((K, "controlnet_blocks.*"), (K, "controlnet_single_blocks.*"), (K, "controlnet_x_embedder"),
                     (K, "controlnet_mode_embedder"))
_XLABS_KEEPS = ((K, "controlnet_blocks.*"), (K, "pos_embed_input"))


def _controlnet_diffusers(block, x_emb, cx_emb):   # controlnet_blocks.N [h, h]; (controlnet_)x_embedder [h, c]
    h = block[1]
    return _mat(block, h, h) and _mat(x_emb, h) and _mat(cx_emb, h)


def _controlnet_xlabs(block, qkv):                 # controlnet_blocks.N [h, h]; double_blocks.N.img_attn.qkv [3h, h]
    h = block[1]
    return _mat(block, h, h) and _mat(qkv, 3 * h, h)


FLUX_CONTROLNET = _preset(
    "flux_controlnet",
    "FLUX.1 ControlNet (diffusers/InstantX/Union, XLabs): attention, MLP and modulation linears of its blocks in FP8",
    _Architecture((
        _Signature(r"controlnet_blocks\.(?P<i>\d+)\.weight", ("x_embedder.weight", "controlnet_x_embedder.weight"),
                   _controlnet_diffusers, _FLUX_DIFFUSERS_BLOCK_RULES + _CONTROLNET_KEEPS),
        _Signature(r"controlnet_blocks\.(?P<i>\d+)\.weight", ("double_blocks.{i}.img_attn.qkv.weight",),
                   _controlnet_xlabs, _FLUX_BFL_DOUBLE_RULES + _XLABS_KEEPS),
    )),
    detection=("controlnet_blocks.N [h,h] with FLUX.1 blocks under the same prefix: diffusers names, with "
               "x_embedder and controlnet_x_embedder [h,c] (InstantX, Shakker-Labs Union, diffusers "
               "FluxControlNetModel), or BFL names, with double_blocks.N.img_attn.qkv [3h,h] (XLabs)"),
    quantizes=(("attention and MLP linears of its FLUX blocks", "as in the flux preset: " + _WHY_DIT_ATTN),
               ("AdaLN modulation of its blocks (norm1.linear, norm1_context.linear, norm.linear; img_mod.lin, "
                "txt_mod.lin)", "as in the flux preset: " + _why_modulation(
                    _FLUX_MOD_RELEASES, "about 27% of the block weights", *_FLUX_MOD_FLAGS))),
    keeps=(("controlnet_blocks, controlnet_single_blocks", "the ControlNet's output projections: every residual "
            "it adds to the base model passes through one of them, unnormalised; trained from zero, so their "
            "weights are small and unlike the blocks'. The base model's proj_out is kept for the same reason "
            "(and modelopt disables every *proj_out*)"),
           ("controlnet_x_embedder, controlnet_mode_embedder (Union); pos_embed_input, input_hint_block (XLabs)",
            "the control image's input projection and encoder, and the mode embedding: " + _WHY_EMBED),
           ("x_embedder, context_embedder, time_text_embed (img_in, txt_in, time_in, vector_in, guidance_in)",
            _WHY_EMBED),
           ("norms, biases", _WHY_NORMS)),
    reference=("No published FP8 FLUX ControlNet with a checkable layer list was found. The block rules are the "
               "flux preset's, per-block modulation quantized (add " + " or ".join(_FLUX_MOD_FLAGS) +
               " to keep it in BF16, ~27% of the block weights); the ControlNet's own output "
               "projections are kept, where a converter quantizing every nn.Linear would take them too. "
               "SD3 ControlNets (controlnet_blocks beside SD3 blocks) are left to the generic policy."),
    attention='as flux: the attention projections of its double and single blocks',
)


# ----------------------------------------------------------------------------- SD3 / SD3.5

_SD3_DIFFUSERS_RULES = (
    (Q, r"re:transformer_blocks\.\d+\.(attn|attn2)\." + _ATTN_DIFFUSERS + r"\.weight"),
    (Q, r"re:transformer_blocks\.\d+\.(ff|ff_context)\.net\.(0\.proj|2)\.weight"),
    (Q, r"re:transformer_blocks\.\d+\.(norm1|norm1_context)\.linear\.weight"),
    (K, "context_embedder"), (K, "time_text_embed.*"), (K, "norm_out.*"), (K, "proj_out"),
)
_SD3_MMDIT_RULES = (
    (Q, r"re:joint_blocks\.\d+\.(x_block|context_block)\.(attn|attn2)\.(qkv|proj)\.weight"),
    (Q, r"re:joint_blocks\.\d+\.(x_block|context_block)\.mlp\.(fc1|fc2)\.weight"),
    (Q, r"re:joint_blocks\.\d+\.(x_block|context_block)\.adaLN_modulation\.1\.weight"),
    (K, "context_embedder"), (K, "t_embedder.*"), (K, "y_embedder.*"), (K, "final_layer.*"),
)


def _sd3_block(norm1c, add_k, conv):   # norm1_context.linear [6h or 2h, h]; add_k_proj [h', c]; pos_embed.proj conv
    h = norm1c[1]
    return _mat(norm1c, None, h) and norm1c[0] in (2 * h, 6 * h) and _mat(add_k) and len(conv) == 4


def _sd3_dual(q, norm1c):              # SD3.5 dual attention: attn2.to_q [h, h] beside norm1_context.linear [., h]
    return _mat(q, q[1], q[1]) and _mat(norm1c, None, q[1])


def _mmdit_block(qkv, mod):            # x_block.attn.qkv [3h, h], x_block.adaLN_modulation.1 [kh, h]
    h = qkv[1]
    return _mat(qkv, 3 * h, h) and _mat(mod, None, h) and mod[0] % h == 0


SD3 = _preset(
    "sd3", "Stable Diffusion 3 / 3.5 MMDiT (diffusers or ComfyUI/SAI names): attention, MLP and modulation "
           "linears in FP8",
    _Architecture((
        _Signature(r"transformer_blocks\.(?P<i>\d+)\.norm1_context\.linear\.weight",
                   ("transformer_blocks.{i}.attn.add_k_proj.weight", "pos_embed.proj.weight"),
                   _sd3_block, _SD3_DIFFUSERS_RULES),
        _Signature(r"transformer_blocks\.(?P<i>\d+)\.attn2\.to_q\.weight",
                   ("transformer_blocks.{i}.norm1_context.linear.weight",), _sd3_dual, _SD3_DIFFUSERS_RULES),
        _Signature(r"joint_blocks\.(?P<i>\d+)\.x_block\.attn\.qkv\.weight",
                   ("joint_blocks.{i}.x_block.adaLN_modulation.1.weight",), _mmdit_block, _SD3_MMDIT_RULES),
    ), absent=(r"single_transformer_blocks\..*", r"controlnet_.*", r"transformer_blocks\.\d+\.img_mod\..*")),
    detection=("diffusers names: transformer_blocks.N.norm1_context.linear [6h or 2h (context_pre_only), h] with "
               "attn.add_k_proj and a conv pos_embed.proj, or transformer_blocks.N.attn2.to_q (SD3.5's dual "
               "attention); ComfyUI/SAI names: joint_blocks.N.x_block.attn.qkv [3h,h] with "
               "x_block.adaLN_modulation.1 [kh,h]. Not with single_transformer_blocks (FLUX), img_mod "
               "(Qwen-Image) or controlnet_* under the same prefix"),
    quantizes=(("attention of both streams: attn (and SD3.5's attn2) to_q/k/v/out.0, add_q/k/v_proj, "
                "to_add_out (x_block/context_block attn.qkv, attn.proj, attn2.*); the last block's context "
                "stream (context_pre_only) has only q/k/v projections, quantized like the others",
                _WHY_DIT_ATTN.replace("RMS qk-norms", "qk-norms (SD3.5)")),
               ("MLPs: ff, ff_context (mlp.fc1, mlp.fc2)", "the bulk of the weights"),
               ("AdaLN modulation of every block: norm1.linear, norm1_context.linear "
                "(x_block/context_block.adaLN_modulation.1)",
                _why_modulation("the published FP8 files follow the every-nn.Linear rule that takes it "
                                "(Comfy-Org's sd3.5_large_fp8_scaled, whose layer list was not inspected), as "
                                "does modelopt's default diffusers filter",
                                "about a third of the block weights (2.7B of SD3.5 Large's 8.1B parameters)",
                                *_SD3_MOD_FLAGS))),
    keeps=(("pos_embed, context_embedder, time_text_embed (x_embedder, t_embedder, y_embedder)",
            _WHY_EMBED + "; the patch-embedding convolution is kept by the default policy"),
           ("norm_out.linear, proj_out (final_layer.adaLN_modulation, final_layer.linear)", _WHY_FINAL),
           ("norms (SD3.5's qk RMS norms, ln_q/ln_k), biases", _WHY_NORMS)),
    reference=("Comfy-Org publishes sd3.5_large_fp8_scaled; its layer list could not be inspected (legacy "
               "scaled-FP8 files quantize every nn.Linear, modulation and final layer included). Like them, "
               "this preset quantizes the per-block modulation; it keeps the embedders and the final layer. "
               "Add " + " or ".join(_SD3_MOD_FLAGS) + " to keep the modulation in BF16 (+~2.7 GB for SD3.5 "
               "Large)."),
    attention="attn (and SD3.5's attn2) to_q/k/v, to_out.0; the context stream's add_q/k/v_proj, to_add_out (SAI: x_block/context_block attn.qkv, attn.proj, attn2.qkv, attn2.proj)",
)


# ----------------------------------------------------------------------------- Qwen-Image

_QWEN_RULES = (   # Comfy-Org/comfy-quants configs/qwen_image_2512_fp8_static.yaml: its include, then its exclude
    (Q, r"re:transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|to_add_out|add_q_proj|add_k_proj|add_v_proj)"
        r"\.weight"),
    (Q, r"re:transformer_blocks\.\d+\.(img_mlp|txt_mlp)\.net\.(0\.proj|2)\.weight"),
    (Q, r"re:transformer_blocks\.\d+\.(img_mod|txt_mod)\.1\.weight"),
    (K, "transformer_blocks.0.img_mod.1"),
    (K, "img_in"), (K, "txt_in"), (K, "txt_norm"), (K, "time_text_embed.*"), (K, "norm_out.*"), (K, "proj_out"),
)


def _qwen_block(img_mod, txt_mod, add_q):   # img_mod.1 and txt_mod.1 [6h, h], attn.add_q_proj [., h]
    h = img_mod[1]
    return _mat(img_mod, 6 * h, h) and _mat(txt_mod, 6 * h, h) and _mat(add_q, None, h)


def _qwen_variant(infos, root):
    """Mage-Flow runs Qwen-Image's blocks; ComfyUI tells it apart by a 2560-wide txt_norm and a 128-row proj_out
    (Qwen-Image's are 3584 and 64). Qwen-Image itself stays unnamed, as before."""
    txt_norm, proj_out = infos.get(root + "txt_norm.weight"), infos.get(root + "proj_out.weight")
    if txt_norm is not None and proj_out is not None and txt_norm.shape[0] == 2560 and proj_out.shape[0] == 128:
        return "Mage-Flow"
    return ""


QWEN_IMAGE = _preset(
    "qwen_image", "Qwen-Image transformer (diffusers/ComfyUI names): Comfy-Org comfy-quants' FP8 layer list",
    _Architecture((
        _Signature(r"transformer_blocks\.(?P<i>\d+)\.img_mod\.1\.weight",
                   ("transformer_blocks.{i}.txt_mod.1.weight", "transformer_blocks.{i}.attn.add_q_proj.weight"),
                   _qwen_block, _QWEN_RULES),
    ), absent=(r"controlnet_.*",)),
    detection=("transformer_blocks.N.img_mod.1 and txt_mod.1 [6h,h] with attn.add_q_proj [.,h] under one "
               "prefix (diffusers and ComfyUI use the same names); not with controlnet_* keys. Mage-Flow (Qwen-Image's "
               "blocks; a 2560-wide txt_norm and 128-row proj_out, as ComfyUI tells it) is named Mage-Flow"),
    quantizes=(("attn.to_q/k/v, to_out.0, to_add_out, add_q/k/v_proj; img_mlp, txt_mlp; img_mod.1 and "
                "txt_mod.1 of every block but the first's img_mod.1",
                "exactly the include list of Comfy-Org's own FP8 exporter config, modulation included"),),
    keeps=(("transformer_blocks.0.img_mod.1", "the first block's image modulation: excluded by comfy-quants' "
            "config and by convert-to-quant's --qwen preset"),
           ("img_in, txt_in, time_text_embed", _WHY_EMBED),
           ("norm_out.linear, proj_out", _WHY_FINAL + "; comfy-quants excludes *norm_out* and *proj_out*"),
           ("txt_norm, qk norms (norm_q/k, norm_added_q/k), biases",
            _WHY_NORMS + "; comfy-quants excludes *.norm* and *txt_norm*")),
    reference=("Follows Comfy-Org/comfy-quants configs/qwen_image_2512_fp8_static.yaml. modelopt's Qwen-Image "
               "recipe is more conservative (keeps transformer_blocks 0, 1, 58 and 59 whole) and kuantala "
               "keeps the first and last three blocks: add --keep 'transformer_blocks.0.*' and so on to follow "
               "them. Like the flux and sd3 presets it quantizes the per-block modulation (about a third of the "
               "block weights), block 0's img_mod excepted, as the official config does."),
    attention='attn.to_q/k/v, to_out.0, add_q/k/v_proj, to_add_out of every block',
    variant=_qwen_variant,
)


# ----------------------------------------------------------------------------- SD1.x / SD2.x / SDXL UNet

_UNET_STAGE = r"(down_blocks\.\d+|mid_block|up_blocks\.\d+)\.attentions\.\d+"
_LDM_STAGE = r"(input_blocks\.\d+|middle_block|output_blocks\.\d+)\.\d+"


def _unet_rules(stage: str, resnet_time: str) -> tuple[tuple[Action, str], ...]:
    return (
        (Q, "re:" + stage + r"\.transformer_blocks\.\d+\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)\.weight"),
        (Q, "re:" + stage + r"\.transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)\.weight"),
        (K, "re:" + stage + r"\.(proj_in|proj_out)"),
        (K, "re:" + resnet_time),
    )


_UNET_DIFFUSERS_RULES = _unet_rules(
    _UNET_STAGE, r"(down_blocks\.\d+|mid_block|up_blocks\.\d+)\.resnets\.\d+\.time_emb_proj") + (
    (K, "time_embedding.*"), (K, "add_embedding.*"), (K, "class_embedding.*"))
# Stable Video Diffusion's temporal layers (LDM names; SD1.x/SDXL have none): its time_stack transformers are
# quantized like the spatial ones, its temporal resblocks' timestep projection and the frame-index embedding
# (time_pos_embed) kept like time_emb_proj and time_embed.
_SVD_RULES = (
    (Q, "re:" + _LDM_STAGE + r"\.time_stack\.\d+\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)\.weight"),
    (Q, "re:" + _LDM_STAGE + r"\.time_stack\.\d+\.(ff|ff_in)\.net\.(0\.proj|2)\.weight"),
    (K, "re:" + _LDM_STAGE + r"\.time_stack\.emb_layers\.\d+"),
    (K, "re:" + _LDM_STAGE + r"\.time_pos_embed\.\d+"),
)
_UNET_LDM_RULES = _unet_rules(_LDM_STAGE, _LDM_STAGE + r"\.emb_layers\.\d+") + (
    (K, "time_embed.*"), (K, "label_emb.*")) + _SVD_RULES


def _unet_variant(infos, root):
    """Only Stable Video Diffusion is named (SD1.x / SD2.x / SDXL are told apart by block counts alone)."""
    return "Stable Video Diffusion" if any(".time_stack." in k for k in infos if k.startswith(root)) else ""

UNET = _preset(
    "unet", "SD1.x / SD2.x / SDXL UNet (diffusers or LDM names): attention and feed-forward of its transformers",
    _Architecture((
        _Signature(_UNET_STAGE + r"\.transformer_blocks\.(?P<i>\d+)\.attn2\.to_k\.weight", (), _mat,
                   _UNET_DIFFUSERS_RULES),
        _Signature(_LDM_STAGE + r"\.transformer_blocks\.(?P<i>\d+)\.attn2\.to_k\.weight", (), _mat, _UNET_LDM_RULES),
    )),
    detection=("a cross-attention attn2.to_k matrix in a UNet's spatial transformer: "
               "{down_blocks.N|mid_block|up_blocks.N}.attentions.M.transformer_blocks.K (diffusers) or "
               "{input_blocks.N|middle_block|output_blocks.N}.M.transformer_blocks.K (LDM/ComfyUI, e.g. under "
               "model.diffusion_model.). ControlNets built like the UNet's encoder are recognised too"),
    quantizes=(("attn1 (self) and attn2 (cross) to_q/k/v/out.0 of every transformer block",
                "the generic policy keeps attention because it does not know the architecture; these are plain "
                "projections over well-behaved activations, a third of the transformer weights, and ComfyUI's "
                "legacy scaled-FP8 convention converts every nn.Linear"),
               ("ff.net.0.proj (GEGLU), ff.net.2", "the bulk of the transformer weights"),
               ("Stable Video Diffusion's temporal transformers: time_stack.N attn1/attn2, ff, ff_in",
                "the same layers in the temporal direction, quantized like the spatial ones")),
    keeps=(("convolutions (conv_in/out, resnets, up/downsamplers, SD1.x's 1x1 proj_in/out)",
            "left to the default policy, which keeps them: ComfyUI's FP8 loaders only quantize nn.Linear; "
            "--quantize-conv still quantizes them (except SD1.x's 1x1 proj_in/out, which the rule below keeps)"),
           ("proj_in, proj_out of every spatial transformer", "entry and exit of each transformer into the "
            "convolutional residual stream (proj_out starts from zero in training); about 1% of the weights "
            "(modelopt disables *proj_out*, kuantala keeps both)"),
           ("resnets' time_emb_proj (LDM emb_layers)", "the resnets' timestep conditioning, modulation-like and "
            "about 1% of the weights; modelopt's diffusers recipe keeps it"),
           ("time_embedding, add_embedding (SDXL), class_embedding (LDM time_embed, label_emb)", _WHY_EMBED),
           ("SVD: time_stack.emb_layers of the temporal resblocks, time_pos_embed (frame-index embedding)",
            "the temporal twins of time_emb_proj and time_embed, kept for the same reasons"),
           ("norms (GroupNorm, LayerNorm), biases", _WHY_NORMS)),
    reference=("No official FP8 SD1.5/SDXL file with a checkable layer list was found; legacy scaled-FP8 files "
               "quantize every nn.Linear, including proj_in/out and time_emb_proj, which this preset keeps "
               "(about 2% of an SDXL UNet). Convolutions stay BF16 as in every ComfyUI-loadable file."),
    attention='attn1 (self) and attn2 (cross) to_q/k/v, to_out.0 of every transformer block (and of SVD\'s '
              'time_stack)',
    variant=_unet_variant,
)
