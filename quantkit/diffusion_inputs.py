"""Seeded random inputs for the diffusers models ``validate --model-output`` can run.

One builder per diffusers class, registered under the name a model's ``config.json`` gives in
``_class_name``. A builder reads the shapes it needs from the model's config and returns the
keyword inputs of the model's ``forward`` and a description of them in words. Sizes are small
(64 latent tokens or patches, 16 text tokens, 32x32 pixels) so a check runs on CPU; values
are standard normal (pixels uniform in [-1, 1]): not realistic, but the same for the source
and the quantized run, which is all the comparison needs. The two batch rows sit early and
late in denoising (timesteps 250 and 750 of 1000).

>>> inputs = diffusion_inputs("FluxTransformer2DModel", model.config, seed=0)   # doctest: +SKIP
>>> model(**inputs.kwargs, return_dict=False)                                   # doctest: +SKIP
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import UnsupportedInputError

BATCH = 2
GRID = 8              # latent tokens / patches per side: 64 per image
TEXT_TOKENS = 16
PIXELS = 32           # VAE input side
LATENT_SIDE = 16      # UNet latent side (128 pixels)
TIMESTEPS = (250.0, 750.0)
GUIDANCE = 3.5        # FLUX.1-dev's default distilled guidance


@dataclass(frozen=True)
class ModelInputs:
    kwargs: dict
    words: str


@dataclass(frozen=True)
class Shape:
    """How many rows, at which timesteps (of 1000, one per row), with how many text tokens. The
    default is what ``validate --model-output`` feeds; calibration asks for other timesteps."""

    batch: int = BATCH
    timesteps: tuple[float, ...] = TIMESTEPS
    text_tokens: int = TEXT_TOKENS

    def __post_init__(self):
        if self.batch < 1 or self.text_tokens < 1 or len(self.timesteps) != self.batch:
            raise ValueError(f"{self}: give one timestep per row and at least one row and one text token")


DEFAULT = Shape()
_BUILDERS: dict[str, Callable[[object, torch.Generator, Shape], ModelInputs]] = {}


def _inputs_for(*class_names: str):
    def register(builder):
        for name in class_names:
            _BUILDERS[name] = builder
        return builder
    return register


def supported() -> list[str]:
    """The diffusers class names that have an input builder."""
    return sorted(_BUILDERS)


def check_supported(class_name: str, path: str | None = None) -> None:
    """Raise ``UnsupportedInputError`` (listing the supported classes) unless ``class_name`` has a builder."""
    if class_name not in _BUILDERS:
        raise UnsupportedInputError(f"--model-output has no inputs for the diffusers class {class_name} (it runs "
                                    f"{', '.join(supported())})", path=path,
                                    hint="validate it per tensor (without --model-output)")


def diffusion_inputs(class_name: str, config, seed: int = 0, path: str | None = None,
                     shape: Shape = DEFAULT) -> ModelInputs:
    """Inputs for a model of diffusers class ``class_name`` built from ``config`` (its ``.config``),
    ``shape.batch`` rows at ``shape.timesteps``. The same ``seed`` draws the same latents whatever
    the timesteps (the noise a denoising run starts from)."""
    check_supported(class_name, path)
    try:
        return _BUILDERS[class_name](config, torch.Generator().manual_seed(seed), shape)
    except UnsupportedInputError as exc:        # a variant of the class its builder does not feed
        raise UnsupportedInputError(exc.message, path=path, hint=exc.hint) from None


def _refused(what: str) -> UnsupportedInputError:
    return UnsupportedInputError(f"--model-output {what}", hint="validate it per tensor (without --model-output)")


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


def _token_ids(n_axes: int) -> torch.Tensor:
    """FLUX position ids of a GRID x GRID token image: (0, row, col) per token."""
    ids = torch.zeros(GRID * GRID, n_axes)
    ids[:, -2] = torch.arange(GRID).repeat_interleave(GRID)
    ids[:, -1] = torch.arange(GRID).repeat(GRID)
    return ids


def _words(shape: Shape, latents: str, timesteps, extra: str = "") -> str:
    return (f"{shape.batch} x {latents}, {shape.text_tokens} text tokens, "
            f"timesteps {'/'.join(f'{t:g}' for t in timesteps)}{extra}")


@_inputs_for("FluxTransformer2DModel")
def _flux(config, gen, shape: Shape) -> ModelInputs:
    kw, extra = _flux_kwargs(config, gen, shape)
    return ModelInputs(kw, _words(shape, f"{GRID * GRID} packed latent tokens of {config.in_channels} channels",
                                  kw["timestep"].tolist(), extra))


@_inputs_for("FluxControlNetModel")
def _flux_controlnet(config, gen, shape: Shape) -> ModelInputs:
    if config.conditioning_embedding_channels is not None:
        raise _refused("feeds a FLUX ControlNet packed latents; this one takes an image "
                       "(conditioning_embedding_channels)")
    kw, extra = _flux_kwargs(config, gen, shape)
    kw["controlnet_cond"] = _randn(gen, *kw["hidden_states"].shape)
    extra += ", packed-latent control input"
    if config.num_mode is not None:                    # ControlNet-Union: one control mode per row
        kw["controlnet_mode"] = torch.arange(shape.batch).remainder(config.num_mode)[:, None]
        extra += f", modes {kw['controlnet_mode'].flatten().tolist()}"
    return ModelInputs(kw, _words(shape, f"{GRID * GRID} packed latent tokens of {config.in_channels} channels",
                                  kw["timestep"].tolist(), extra))


def _flux_kwargs(config, gen, shape: Shape) -> tuple[dict, str]:
    n_axes, b = len(config.axes_dims_rope), shape.batch
    kw = {"hidden_states": _randn(gen, b, GRID * GRID, config.in_channels),
          "encoder_hidden_states": _randn(gen, b, shape.text_tokens, config.joint_attention_dim),
          "pooled_projections": _randn(gen, b, config.pooled_projection_dim),
          # the model multiplies timestep and guidance by 1000
          "timestep": torch.tensor([t / 1000 for t in shape.timesteps]),
          "img_ids": _token_ids(n_axes), "txt_ids": torch.zeros(shape.text_tokens, n_axes)}
    if not config.guidance_embeds:
        return kw, ""
    kw["guidance"] = torch.full((b,), GUIDANCE)
    return kw, f", guidance {GUIDANCE:g}"


@_inputs_for("SD3Transformer2DModel")
def _sd3(config, gen, shape: Shape) -> ModelInputs:
    side, b = GRID * config.patch_size, shape.batch
    kw = {"hidden_states": _randn(gen, b, config.in_channels, side, side),
          "encoder_hidden_states": _randn(gen, b, shape.text_tokens, config.joint_attention_dim),
          "pooled_projections": _randn(gen, b, config.pooled_projection_dim),
          "timestep": torch.tensor(shape.timesteps)}
    return ModelInputs(kw, _words(shape, f"{config.in_channels}x{side}x{side} latents", shape.timesteps))


@_inputs_for("UNet2DConditionModel")
def _unet(config, gen, shape: Shape) -> ModelInputs:
    conditioning = {"class_embed_type": config.class_embed_type, "encoder_hid_dim_type": config.encoder_hid_dim_type,
                    "addition_embed_type": None if config.addition_embed_type == "text_time"
                    else config.addition_embed_type}
    other = ", ".join(f"{k}={v!r}" for k, v in conditioning.items() if v is not None)
    if other:
        raise _refused(f"feeds UNets conditioned on text (SD1.x/2.x, SDXL's text_time); this one has {other}")
    dim = config.cross_attention_dim
    dim = dim if isinstance(dim, int) else dim[0]
    kw = {"sample": _randn(gen, shape.batch, config.in_channels, LATENT_SIDE, LATENT_SIDE),
          "timestep": torch.tensor([int(t) for t in shape.timesteps]),
          "encoder_hidden_states": _randn(gen, shape.batch, shape.text_tokens, dim)}
    extra = ""
    if config.addition_embed_type == "text_time":
        kw["added_cond_kwargs"] = _sdxl_added_cond(config, gen, shape.batch)
        extra = ", SDXL pooled text embeds and size/crop time ids"
    return ModelInputs(kw, _words(shape, f"{config.in_channels}x{LATENT_SIDE}x{LATENT_SIDE} latents",
                                  shape.timesteps, extra))


def _sdxl_added_cond(config, gen, batch: int) -> dict:
    """SDXL's pooled text embedding and micro-conditioning ids. The config gives only their total
    width (text + n_ids * addition_time_embed_dim); any split feeds the same add_embedding, so
    take the base model's 6 ids (original size, crop corner, target size) when they fit."""
    width, per_id = config.projection_class_embeddings_input_dim, config.addition_time_embed_dim
    n_ids = min(6, width // per_id - 1)
    if n_ids < 1:
        raise _refused(f"finds no room for SDXL time ids of width {per_id} in a text_time embedding of {width}")
    size = LATENT_SIDE * 8
    ids = torch.tensor([size, size, 0, 0, size, size][:n_ids], dtype=torch.float32)
    return {"text_embeds": _randn(gen, batch, width - n_ids * per_id), "time_ids": ids.repeat(batch, 1)}


@_inputs_for("AutoencoderKL")
def _vae(config, gen, shape: Shape) -> ModelInputs:
    sample = torch.rand(shape.batch, config.in_channels, PIXELS, PIXELS, generator=gen) * 2 - 1
    # sample_posterior=False decodes the posterior's mode: deterministic, so both runs compare
    kw = {"sample": sample, "sample_posterior": False}
    return ModelInputs(kw, f"{shape.batch} x {config.in_channels}x{PIXELS}x{PIXELS} images in [-1, 1], encoded and "
                           "decoded from the posterior mode")


@_inputs_for("QwenImageTransformer2DModel")
def _qwen_image(config, gen, shape: Shape) -> ModelInputs:
    for field in ("zero_cond_t", "use_additional_t_cond", "use_layer3d_rope"):
        if config.get(field):
            raise _refused(f"feeds Qwen-Image text-to-image transformers; this one has {field}")
    tokens, channels, b = GRID * GRID, config.in_channels, shape.batch
    timesteps = [t / 1000 for t in shape.timesteps]    # Qwen-Image's pipeline passes t / 1000
    kw = {"hidden_states": _randn(gen, b, tokens, channels),
          "encoder_hidden_states": _randn(gen, b, shape.text_tokens, config.joint_attention_dim),
          "encoder_hidden_states_mask": torch.ones(b, shape.text_tokens, dtype=torch.long),
          "timestep": torch.tensor(timesteps), "img_shapes": [(1, GRID, GRID)] * b}
    extra = ""
    if config.guidance_embeds:
        kw["guidance"] = torch.full((b,), GUIDANCE)
        extra = f", guidance {GUIDANCE:g}"
    return ModelInputs(kw, _words(shape, f"{tokens} packed latent tokens of {channels} channels", timesteps, extra))
