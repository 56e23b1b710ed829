"""Tiny but real diffusers / transformers architectures, built offline from config dicts.

Every builder seeds torch (``seed``, default 0), builds the model from the config dict shown
in its module-level ``*_CONFIG`` constant, and returns it in eval mode with float32 weights.
Key names are exactly those of the full-size models; only the dimensions are small (hidden
sizes 32-64), so each model builds and runs a forward pass in well under a second on CPU
(after the one-off import of diffusers / transformers, several seconds).

    from tiny_models import BUILDERS, build, forward, save_state_dict   # pytest puts tests/ on sys.path
    model = build("flux")                      # or tiny_flux()
    save_state_dict(model, tmp_path / "flux.safetensors")   # BF16 file, ties cloned

    out = forward("flux", model)               # main output tensor on example_inputs("flux")

Note: real architectures zero-initialise some layers (FluxControlNetModel's ``controlnet_blocks``,
``controlnet_single_blocks`` and ``controlnet_x_embedder``; many norm biases); they stay all-zero
here, exactly as in a freshly initialised checkpoint. Non-persistent buffers (CLIP's
``position_ids`` in recent transformers) are not in ``state_dict()``.
"""
from __future__ import annotations

import copy
import os
import warnings
from typing import Callable

import torch

# ----------------------------------------------------------------------------- configs
# diffusers models (class -> from_config(dict)); head dims chosen so that sum(axes_dims_rope) == head dim.

FLUX_CONFIG = dict(patch_size=1, in_channels=16, out_channels=None, num_layers=2, num_single_layers=2,
                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                   pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))

FLUX_CONTROLNET_CONFIG = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                              pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=[4, 6, 6],
                              num_mode=3)

# SD3.5-like: dual attention in block 0 and RMS qk-norm; the last block is context_pre_only.
SD3_CONFIG = dict(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
                  num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32,
                  pooled_projection_dim=32, out_channels=4, pos_embed_max_size=16,
                  dual_attention_layers=(0,), qk_norm="rms_norm")

# SD1.5-like: 1x1 conv proj_in/proj_out around the transformer blocks.
UNET_SD15_CONFIG = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                        mid_block_type="UNetMidBlock2DCrossAttn", layers_per_block=1,
                        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)

# SDXL-like: linear proj_in/proj_out, two transformer layers per block, text_time add-embedding.
UNET_SDXL_CONFIG = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                        mid_block_type="UNetMidBlock2DCrossAttn", layers_per_block=1,
                        transformer_layers_per_block=(1, 2), cross_attention_dim=32,
                        attention_head_dim=(4, 8), norm_num_groups=8, use_linear_projection=True,
                        addition_embed_type="text_time", addition_time_embed_dim=8,
                        projection_class_embeddings_input_dim=32 + 6 * 8)

VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                  down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                  up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), layers_per_block=1,
                  norm_num_groups=8, sample_size=32)

QWEN_IMAGE_CONFIG = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                         num_attention_heads=2, joint_attention_dim=32, guidance_embeds=False,
                         axes_dims_rope=(4, 6, 6))

# FLUX.2-like: fused single-stream attn.to_qkv_mlp_proj, shared modulation layers.
FLUX2_CONFIG = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
                    num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=32,
                    axes_dims_rope=(4, 4, 4, 4), guidance_embeds=True)

# Wan 2.1 I2V-like: image condition embedder and added K/V projections in cross-attention.
WAN_CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                  out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, image_dim=32,
                  added_kv_proj_dim=32)

# HunyuanVideo: a token refiner (transformer blocks) nested inside context_embedder.
HUNYUAN_VIDEO_CONFIG = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                            num_layers=1, num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0,
                            patch_size=1, patch_size_t=1, text_embed_dim=32, pooled_projection_dim=32,
                            rope_axes_dim=(4, 6, 6))

# transformers models (Config(**dict) -> Model(config)).
CLIP_TEXT_CONFIG = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, max_position_embeddings=77, projection_dim=32,
                        bos_token_id=0, eos_token_id=2, pad_token_id=1)

# T5 v1.1 (FLUX / SD3 text encoder 3): gated-gelu, untied.
T5_CONFIG = dict(vocab_size=1000, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                 relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                 tie_word_embeddings=False)

BERT_CONFIG = dict(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=64, max_position_embeddings=64)

LLAMA_CONFIG = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                    tie_word_embeddings=False)

# GPT-2 ties lm_head to wte and uses Conv1D (weight stored [in, out]).
GPT2_CONFIG = dict(vocab_size=1000, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=0,
                   eos_token_id=0)


# ----------------------------------------------------------------------------- builders

def _diffusers(cls_name: str, config: dict, seed: int) -> torch.nn.Module:
    import diffusers
    torch.manual_seed(seed)
    with warnings.catch_warnings():   # e.g. FluxControlNetModel's internal FluxPosEmbed deprecation
        warnings.simplefilter("ignore", FutureWarning)
        return getattr(diffusers, cls_name).from_config(copy.deepcopy(config)).eval()


def _transformers(model_cls: str, config_cls: str, config: dict, seed: int) -> torch.nn.Module:
    import transformers
    torch.manual_seed(seed)
    cfg = getattr(transformers, config_cls)(**copy.deepcopy(config))
    return getattr(transformers, model_cls)(cfg).eval()


def tiny_flux(seed: int = 0) -> torch.nn.Module:
    """diffusers FluxTransformer2DModel (FLUX.1-dev layout, guidance embeds), FLUX_CONFIG."""
    return _diffusers("FluxTransformer2DModel", FLUX_CONFIG, seed)


def tiny_flux_controlnet(seed: int = 0) -> torch.nn.Module:
    """diffusers FluxControlNetModel (union: num_mode=3), FLUX_CONTROLNET_CONFIG."""
    return _diffusers("FluxControlNetModel", FLUX_CONTROLNET_CONFIG, seed)


def tiny_sd3(seed: int = 0) -> torch.nn.Module:
    """diffusers SD3Transformer2DModel (SD3.5-like: dual attention, rms qk-norm), SD3_CONFIG."""
    return _diffusers("SD3Transformer2DModel", SD3_CONFIG, seed)


def tiny_unet_sd15(seed: int = 0) -> torch.nn.Module:
    """diffusers UNet2DConditionModel, SD1.5-like (conv proj_in/out), UNET_SD15_CONFIG."""
    return _diffusers("UNet2DConditionModel", UNET_SD15_CONFIG, seed)


def tiny_unet_sdxl(seed: int = 0) -> torch.nn.Module:
    """diffusers UNet2DConditionModel, SDXL-like (linear proj_in/out, text_time), UNET_SDXL_CONFIG."""
    return _diffusers("UNet2DConditionModel", UNET_SDXL_CONFIG, seed)


def tiny_vae(seed: int = 0) -> torch.nn.Module:
    """diffusers AutoencoderKL (mid-block attention), VAE_CONFIG."""
    return _diffusers("AutoencoderKL", VAE_CONFIG, seed)


def tiny_qwen_image(seed: int = 0) -> torch.nn.Module:
    """diffusers QwenImageTransformer2DModel, QWEN_IMAGE_CONFIG."""
    return _diffusers("QwenImageTransformer2DModel", QWEN_IMAGE_CONFIG, seed)


def tiny_flux2(seed: int = 0) -> torch.nn.Module:
    """diffusers Flux2Transformer2DModel (fused single-stream attention+MLP), FLUX2_CONFIG."""
    return _diffusers("Flux2Transformer2DModel", FLUX2_CONFIG, seed)


def tiny_wan(seed: int = 0) -> torch.nn.Module:
    """diffusers WanTransformer3DModel (I2V-like, image embedder), WAN_CONFIG."""
    return _diffusers("WanTransformer3DModel", WAN_CONFIG, seed)


def tiny_hunyuan_video(seed: int = 0) -> torch.nn.Module:
    """diffusers HunyuanVideoTransformer3DModel (token refiner in context_embedder), HUNYUAN_VIDEO_CONFIG."""
    return _diffusers("HunyuanVideoTransformer3DModel", HUNYUAN_VIDEO_CONFIG, seed)


def tiny_clip_text(seed: int = 0) -> torch.nn.Module:
    """transformers CLIPTextModel (SD text encoder), CLIPTextConfig(**CLIP_TEXT_CONFIG)."""
    return _transformers("CLIPTextModel", "CLIPTextConfig", CLIP_TEXT_CONFIG, seed)


def tiny_clip_text_projection(seed: int = 0) -> torch.nn.Module:
    """transformers CLIPTextModelWithProjection (SDXL text encoder 2), CLIPTextConfig(**CLIP_TEXT_CONFIG)."""
    return _transformers("CLIPTextModelWithProjection", "CLIPTextConfig", CLIP_TEXT_CONFIG, seed)


def tiny_t5_encoder(seed: int = 0) -> torch.nn.Module:
    """transformers T5EncoderModel (T5 v1.1, gated-gelu), T5Config(**T5_CONFIG)."""
    return _transformers("T5EncoderModel", "T5Config", T5_CONFIG, seed)


def tiny_bert(seed: int = 0) -> torch.nn.Module:
    """transformers BertModel (with pooler), BertConfig(**BERT_CONFIG)."""
    return _transformers("BertModel", "BertConfig", BERT_CONFIG, seed)


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    """transformers LlamaForCausalLM (GQA, untied lm_head), LlamaConfig(**LLAMA_CONFIG)."""
    return _transformers("LlamaForCausalLM", "LlamaConfig", LLAMA_CONFIG, seed)


def tiny_gpt2(seed: int = 0) -> torch.nn.Module:
    """transformers GPT2LMHeadModel (Conv1D [in, out] weights, lm_head tied to wte), GPT2Config(**GPT2_CONFIG)."""
    return _transformers("GPT2LMHeadModel", "GPT2Config", GPT2_CONFIG, seed)


BUILDERS: dict[str, Callable[..., torch.nn.Module]] = {
    "flux": tiny_flux,
    "flux_controlnet": tiny_flux_controlnet,
    "sd3": tiny_sd3,
    "unet_sd15": tiny_unet_sd15,
    "unet_sdxl": tiny_unet_sdxl,
    "vae": tiny_vae,
    "qwen_image": tiny_qwen_image,
    "flux2": tiny_flux2,
    "wan": tiny_wan,
    "hunyuan_video": tiny_hunyuan_video,
    "clip_text": tiny_clip_text,
    "clip_text_projection": tiny_clip_text_projection,
    "t5_encoder": tiny_t5_encoder,
    "bert": tiny_bert,
    "llama": tiny_llama,
    "gpt2": tiny_gpt2,
}


def build(name: str, seed: int = 0) -> torch.nn.Module:
    """The tiny model registered in BUILDERS under ``name`` (e.g. "flux", "t5_encoder")."""
    return BUILDERS[name](seed)


# ----------------------------------------------------------------------------- forward

def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


def example_inputs(name: str, seed: int = 0) -> dict:
    """Deterministic keyword inputs (batch 1, float32) for the BUILDERS model ``name``."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda n=8: torch.randint(0, 1000, (1, n), generator=g)  # noqa: E731
    txt = lambda dim=32, n=8: _randn(g, 1, n, dim)  # noqa: E731
    if name in ("flux", "flux_controlnet"):
        kw = dict(hidden_states=_randn(g, 1, 16, 16), encoder_hidden_states=txt(), pooled_projections=_randn(g, 1, 32),
                  timestep=torch.tensor([0.5]), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3),
                  guidance=torch.tensor([3.5]))
        if name == "flux_controlnet":
            kw.update(controlnet_cond=_randn(g, 1, 16, 16), controlnet_mode=torch.tensor([[1]]))
        return kw
    if name == "flux2":
        return dict(hidden_states=_randn(g, 1, 16, 16), encoder_hidden_states=txt(), timestep=torch.tensor([0.5]),
                    img_ids=torch.zeros(16, 4), txt_ids=torch.zeros(8, 4), guidance=torch.tensor([3.5]))
    if name == "sd3":
        return dict(hidden_states=_randn(g, 1, 4, 8, 8), encoder_hidden_states=txt(),
                    pooled_projections=_randn(g, 1, 32), timestep=torch.tensor([500]))
    if name == "qwen_image":
        return dict(hidden_states=_randn(g, 1, 16, 16), encoder_hidden_states=txt(),
                    encoder_hidden_states_mask=torch.ones(1, 8, dtype=torch.long), timestep=torch.tensor([0.5]),
                    img_shapes=[(1, 4, 4)])
    if name == "wan":
        return dict(hidden_states=_randn(g, 1, 4, 1, 8, 8), timestep=torch.tensor([500]), encoder_hidden_states=txt(),
                    encoder_hidden_states_image=txt(n=4))
    if name == "hunyuan_video":
        return dict(hidden_states=_randn(g, 1, 4, 1, 4, 4), timestep=torch.tensor([500]), encoder_hidden_states=txt(),
                    encoder_attention_mask=torch.ones(1, 8, dtype=torch.long), pooled_projections=_randn(g, 1, 32),
                    guidance=torch.tensor([3500.0]))
    if name in ("unet_sd15", "unet_sdxl"):
        kw = dict(sample=_randn(g, 1, 4, 16, 16), timestep=torch.tensor([10]), encoder_hidden_states=txt())
        if name == "unet_sdxl":
            kw["added_cond_kwargs"] = {"text_embeds": _randn(g, 1, 32),
                                       "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])}
        return kw
    if name == "vae":
        return dict(sample=_randn(g, 1, 3, 32, 32), sample_posterior=False)
    if name in BUILDERS:
        return dict(input_ids=ids())
    raise KeyError(name)


def forward(name: str, model: torch.nn.Module, inputs: dict | None = None) -> torch.Tensor:
    """The main output tensor of ``model`` (built by BUILDERS[name]) on example_inputs(name), under no_grad."""
    inputs = example_inputs(name) if inputs is None else inputs
    with torch.no_grad():
        out = model(**inputs, return_dict=False)
    if name == "flux_controlnet":   # (double-block samples, single-block samples)
        return torch.cat([t.flatten() for group in out for t in group])
    return out[0]


def without_zero_layers(model):
    """FluxControlNet zero-initialises its output blocks, which would make its output trivially exact."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


# ----------------------------------------------------------------------------- saving

def state_dict_tensors(model: torch.nn.Module, dtype: torch.dtype | None = torch.bfloat16) -> dict[str, torch.Tensor]:
    """model.state_dict() as contiguous clones (ties broken), floats cast to ``dtype`` (None: as is)."""
    out = {}
    for key, t in model.state_dict().items():
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[key] = t.contiguous().clone()
    return out


def save_state_dict(model: torch.nn.Module, path: str | os.PathLike, dtype: torch.dtype | None = torch.bfloat16,
                    metadata: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Write model.state_dict() to a safetensors file (floats in ``dtype``, ties cloned); returns the tensors."""
    from safetensors.torch import save_file
    tensors = state_dict_tensors(model, dtype)
    save_file(tensors, os.fspath(path), metadata=metadata)
    return tensors


# ----------------------------------------------------------------------------- added for tests/test_presets.py
# Not registered in BUILDERS (tests parametrized over BUILDERS keep their golden files).

QWEN2_MOE_CONFIG = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                        shared_expert_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
                        tie_word_embeddings=False)


def tiny_qwen2_moe(seed: int = 0) -> torch.nn.Module:
    """transformers Qwen2MoeForCausalLM (router mlp.gate, shared expert and its gate), QWEN2_MOE_CONFIG.

    transformers >= 5 holds the routed experts as fused 3-D parameters (``mlp.experts.gate_up_proj``,
    ``mlp.experts.down_proj``); checkpoints on the Hub store them per expert (``mlp.experts.N.gate_proj.weight``).
    """
    return _transformers("Qwen2MoeForCausalLM", "Qwen2MoeConfig", QWEN2_MOE_CONFIG, seed)
