"""Preset for Stable Cascade (Würstchen v3) stages C and B under ComfyUI's names (``plan`` called them generic).

Both stages are convolutional U-Nets whose levels hold ResBlocks (a depthwise convolution, then a channelwise
Linear MLP), TimestepBlocks (a Linear mapping the noise-level embedding to a scale and shift) and, from the
levels that have them, AttnBlocks (a kv_mapper Linear for the condition, then self/cross-attention). The MLPs
and attention projections are the bulk of the weights and become FP8; the timestep mappers are the family's
AdaLN and stay BF16 with the condition mappers, the convolutions and the classifier head.
"""
from __future__ import annotations

from .base import _WHY_NORMS, K, Q, _Architecture, _mat, _preset, _Signature
from .diffusion import _WHY_EMBED, _WHY_FINAL
from .dit_more import WHY_BLOCK_ADALN
from .video import WHY_ATTN, WHY_BULK, WHY_TEXT_INPUT

_LEVELS = r"re:(down_blocks|up_blocks)\.\d+\.\d+\."
_CASCADE_RULES = (
    (Q, _LEVELS + r"channelwise\.(0|4)\.weight"),
    (Q, _LEVELS + r"attention\.attn\.(to_q|to_k|to_v|out_proj)\.weight"),
    (K, _LEVELS + r"mapper(_\w+)?\..*"), (K, _LEVELS + r"kv_mapper\..*"),
    (K, "clip_txt_mapper.*"), (K, "clip_txt_pooled_mapper.*"), (K, "clip_img_mapper.*"), (K, "clip_mapper.*"),
    (K, "effnet_mapper.*"), (K, "pixels_mapper.*"), (K, "embedding.*"), (K, "clf.*"),
)


def _cascade_block(channelwise, clf, mapper):   # channelwise.0 [4c, c(+skip)]; clf.1 a conv; clip mapper [n, k]
    return _mat(channelwise) and len(clf) == 4 and _mat(mapper)


def _cascade_variant(infos, root):
    text = infos.get(root + "clip_txt_mapper.weight")
    if text is not None:
        return "Stable Cascade stage C" + (" lite" if text.shape[0] == 1536 else "")
    channelwise = infos.get(root + "down_blocks.1.0.channelwise.0.weight")
    return "Stable Cascade stage B" + (" lite" if channelwise is not None and channelwise.shape[-1] == 576 else "")


STABLE_CASCADE = _preset(
    "stable_cascade", "Stable Cascade stage C / B (ComfyUI names): ResBlock MLPs and attention in FP8, timestep and "
                      "condition mappers, convolutions and head kept",
    _Architecture((
        _Signature(r"down_blocks\.(?P<i>\d+)\.0\.channelwise\.0\.weight", ("clf.1.weight", "clip_txt_mapper.weight"),
                   _cascade_block, _CASCADE_RULES),
        _Signature(r"down_blocks\.(?P<i>\d+)\.0\.channelwise\.0\.weight", ("clf.1.weight", "clip_mapper.weight"),
                   _cascade_block, _CASCADE_RULES),
    )),
    detection=("ComfyUI names: down_blocks.N.0.channelwise.0 with clf.1 (ComfyUI's marker) and clip_txt_mapper "
               "(stage C) or clip_mapper (stage B) under one prefix; 'lite' from the widths ComfyUI reads "
               "(1536-wide clip_txt_mapper, 576-wide stage B level 1)"),
    quantizes=(("ResBlocks' channelwise.0 / channelwise.4 (the Linear MLP after the depthwise convolution)", WHY_BULK),
               ("AttnBlocks' attention.attn.to_q/to_k/to_v/out_proj", WHY_ATTN)),
    keeps=(("TimestepBlocks' mapper, mapper_sca, mapper_crp", WHY_BLOCK_ADALN),
           ("AttnBlocks' kv_mapper, clip_txt/clip_txt_pooled/clip_img/clip mappers", WHY_TEXT_INPUT),
           ("embedding, effnet_mapper, pixels_mapper (convolutions)", _WHY_EMBED),
           ("clf", _WHY_FINAL),
           ("depthwise and up/down-scaler convolutions, GlobalResponseNorm gamma/beta, norms, biases",
            _WHY_NORMS + "; convolutions stay in their dtype under every preset")),
    reference="No peer keep list for Stable Cascade; the DiT presets' reading applied to its blocks.",
    attention="down_blocks/up_blocks.L.N.attention.attn.to_q/to_k/to_v/out_proj",
    variant=_cascade_variant,
)
