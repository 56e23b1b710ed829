"""Presets: per-architecture policies, detected from a checkpoint's keys and shapes.

A preset contributes rules that run before the user's ``--quantize`` / ``--keep`` rules (so
the user always has the last word) and documents what it keeps in high precision and why.
``auto`` picks the first preset whose ``detect`` accepts the checkpoint and falls back to
``generic`` (the default policy alone) for unknown models.

Detection works per *root*: the key prefix under which an architecture's signature keys sit
(``''``, ``model.diffusion_model.``, ``transformer.``, ``text_encoders.t5xxl.transformer.`` ...).
A signature is a key found in one block plus sibling keys of the same block, with shapes that
must fit together (FLUX's ``img_mod.lin`` is ``[6h, h]`` where its ``img_attn.qkv`` is
``[3h, h]``), so a look-alike name alone does not trigger a preset. Rules are then written for
each root found (globs over the literal prefix, or ``re:`` expressions), so they never touch
another component of the same file. In an all-in-one checkpoint, the text encoders bundled
beside the model get their own presets' rules too (see ``ENCODERS``).

    >>> preset, why = resolve("auto", source.tensors)      # doctest: +SKIP
    >>> policy = Policy().with_preset(preset.name, preset.rules(source.tensors))   # doctest: +SKIP

The presets live by family, each module registering its own on import: ``diffusion`` (flux,
flux_controlnet, sd3, qwen_image, unet), ``video`` (wan, hunyuan_video, ltxv, cosmos, kandinsky5,
mochi), ``image`` (flux2, chroma, lumina2, hidream, auraflow, pixart, hunyuan_dit), ``audio_3d``
(hunyuan3d, ace_step), ``dit_more`` (cogvideox, omnigen2, hunyuan3d21, hidream_o1: before ``llm``, which took it; krea2, ernie_image, lens, ideogram4, joyimage), ``cascade`` (stable_cascade), ``family_encoders`` (umt5, qwen25_vl, gemma3, qwen3, mistral3,
llama3: the diffusion families' text encoders, tried before the general ones) and ``encoders`` (t5_encoder, clip_text, bert, llm). They are imported at the
end of this module in that order, after ``generic``, and ``auto`` tries them in the order they
registered: the first five families keep winning on their own checkpoints, and ACE-Step 1.5 (whose
encoders look like an LLM's) is tried before ``llm``.

Full reasoning and sources for every keep: ``docs/presets.md``.
"""
from __future__ import annotations

from .base import BUNDLED, GENERIC, REGISTRY, Preset, register, resolve  # noqa: F401

# Importing a module registers its presets: this order is the order of REGISTRY, which `auto` tries in turn.
from .diffusion import (FLUX, FLUX_CONTROLNET, KEEP_MODULATION_BFL, KEEP_MODULATION_DIFFUSERS,  # noqa: E402
                        KEEP_MODULATION_MMDIT, QWEN_IMAGE, SD3, UNET)
from .video import COSMOS, HUNYUAN_VIDEO, KANDINSKY5, LTXV, MOCHI, WAN  # noqa: E402
from .image import AURAFLOW, CHROMA, FLUX2, HIDREAM, HUNYUAN_DIT, LUMINA2, PIXART  # noqa: E402
from .audio_3d import ACE_STEP, HUNYUAN3D  # noqa: E402
from .dit_more import (COGVIDEOX, ERNIE_IMAGE, HIDREAM_O1, HUNYUAN3D21, IDEOGRAM4, JOYIMAGE, KREA2,  # noqa: E402
                       LENS, OMNIGEN2)
from .cascade import STABLE_CASCADE  # noqa: E402
from .family_encoders import GEMMA3, LLAMA3, MISTRAL3, QWEN3, QWEN25_VL, UMT5  # noqa: E402
from .encoders import BERT, CLIP_TEXT, LLM, T5  # noqa: E402

# Encoder presets whose rules also apply to their part of an all-in-one checkpoint.
ENCODERS: tuple[Preset, ...] = tuple(BUNDLED)

__all__ = ["Preset", "REGISTRY", "register", "resolve", "GENERIC", "ENCODERS",
           "FLUX", "FLUX_CONTROLNET", "SD3", "QWEN_IMAGE", "UNET", "T5", "CLIP_TEXT", "BERT", "LLM",
           "KEEP_MODULATION_BFL", "KEEP_MODULATION_DIFFUSERS", "KEEP_MODULATION_MMDIT",
           "WAN", "HUNYUAN_VIDEO", "LTXV", "COSMOS", "KANDINSKY5", "MOCHI",
           "UMT5", "QWEN25_VL", "QWEN3", "MISTRAL3", "GEMMA3", "LLAMA3",
           "FLUX2", "CHROMA", "LUMINA2", "HIDREAM", "AURAFLOW", "PIXART", "HUNYUAN_DIT", "HUNYUAN3D", "ACE_STEP",
           "COGVIDEOX", "OMNIGEN2", "HUNYUAN3D21", "HIDREAM_O1", "KREA2", "ERNIE_IMAGE", "LENS", "IDEOGRAM4",
           "JOYIMAGE", "STABLE_CASCADE"]
