"""Calibration inputs: what the source model runs on while its activations are observed.

``CalibrationInputs`` is a list of keyword-input batches (one forward pass each), how many samples
they hold, and a description in words. Streamed mode reads the whole checkpoint from disk once per
pass, so the built-in inputs go in few, wide passes: ``SENTENCES_PER_PASS`` sentences, or up to
``ROWS_PER_PASS`` diffusion rows joined along the batch dimension (``collate``: the model treats
rows independently, so the absmax over a pass is the running max over one-row passes). Three kinds:

- ``text_inputs``: a transformers model (text encoder, LLM) on the sentence set shipped with
  quantkit (``data/sentences.txt``: image-generation prompts, questions, prose, code, numbers,
  a dozen languages), tokenized by the tokenizer in the model's folder, ``SENTENCES_PER_PASS``
  sentences per pass, padded on the right with an attention mask; the mask goes with the batch
  so that only real tokens are observed (a pad token's activations are no sentence's, and
  streamed mode reads the whole model once per pass). A folder without a tokenizer is
  refused: random token ids would measure activations no real text makes (rare embedding rows,
  no sentence structure), and a scale made from them is silently wrong, so the user is asked
  for the tokenizer or a hook instead.
- ``diffusion_calibration_inputs``: a diffusers model on seeded latents over a timestep schedule
  (``steps`` timesteps evenly spread over (0, 1000) for each of ``seeds`` seeds: the same noise at
  every timestep, as a denoising run starts from one noise), built per class by
  ``quantkit.diffusion_inputs``; its text conditioning is the prompt set run through the text
  encoders given (``TextEncoder``), matched to the model's inputs by width, or seeded embeddings.
- ``hook_inputs``: ``module:function`` (an importable module or ``path/to/file.py``) returning an
  iterable of keyword-input dicts, for anything else.

    >>> from quantkit.calibration.inputs import sentences
    >>> len(sentences()) >= 64
    True
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import itertools
import os
from dataclasses import dataclass
from importlib import resources

import torch

from quantkit.errors import OptionsError, UnsupportedInputError

PROMPT_TOKENS = 77          # CLIP's context: every encoder's prompts are padded to it, as pipelines pad
MAX_TOKENS = 128            # a sentence longer than this is truncated (activations of long contexts differ little)
SENTENCES_PER_PASS = 32
ROWS_PER_PASS = 16          # diffusion rows per pass: the default 2 seeds x 4 timesteps are one read of the model
BUILTIN = "builtin"


@dataclass(frozen=True)
class CalibrationInputs:
    """Keyword inputs, one dict per forward pass; ``masks[i]`` (or None) marks the real tokens of
    pass i ([batch, tokens], True where a token is not padding): only those are observed."""

    batches: list[dict]
    words: str
    masks: list[torch.Tensor | None] | None = None
    rows: int | None = None           # samples over all passes (None: one per pass, as a hook's batches count)

    @property
    def samples(self) -> int:
        return self.rows if self.rows is not None else len(self.batches)


def sentences() -> list[str]:
    """The sentence set shipped with quantkit, one per non-empty line."""
    text = resources.files("quantkit.calibration").joinpath("data/sentences.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_tokenizer(folder: str, what: str):
    """The tokenizer saved in ``folder`` (transformers ``AutoTokenizer``, offline), or a one-line refusal."""
    from transformers import AutoTokenizer

    from quantkit.quiet import quiet_transformers
    with quiet_transformers():
        try:
            return AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UnsupportedInputError(f"{what} needs the tokenizer saved beside its config.json, and none loads "
                                        f"({type(exc).__name__}: {str(exc).strip().splitlines()[0][:160]})",
                                        path=folder, hint="save the tokenizer into the folder "
                                        "(tokenizer.save_pretrained), or pass --inputs module:function") from None


def text_inputs(folder: str, model: torch.nn.Module, samples: int | None = None,
                per_pass: int = SENTENCES_PER_PASS, texts: list[str] | None = None,
                named: str = "quantkit's calibration set") -> CalibrationInputs:
    """The sentence set (the first ``samples``; ``texts``, ``named`` so, instead of the built-in one),
    tokenized by ``folder``'s tokenizer, ``per_pass`` sentences per pass, as keyword inputs of
    ``model`` (a transformers model; an encoder-decoder reads the same ids on both sides), with the
    mask of their real tokens."""
    tok = load_tokenizer(folder, "calibrating a transformers model on the built-in sentences" if texts is None
                         else f"running a transformers model on {named}")
    texts = texts if texts is not None else sentences()
    texts = texts[:samples] if samples else texts
    params = inspect.signature(model.forward).parameters
    limit = min(MAX_TOKENS, int(getattr(model.config, "max_position_embeddings", 0) or MAX_TOKENS))
    if tok.pad_token is None:                   # Llama-style tokenizers: any id pads, the mask hides it
        tok.pad_token = tok.eos_token or tok.unk_token
    tok.padding_side = "right"                  # position ids of real tokens as in a lone sentence
    if "attention_mask" not in params or tok.pad_token is None:
        per_pass = 1                            # padding would reach the real tokens through attention
    batches, masks = [], []
    for i in range(0, len(texts), per_pass):
        enc = tok(texts[i:i + per_pass], return_tensors="pt", truncation=True, max_length=limit,
                  padding=per_pass > 1)
        kw = {k: v for k, v in enc.items() if k in params}
        if getattr(model.config, "is_encoder_decoder", False) and "decoder_input_ids" in params:
            kw["decoder_input_ids"] = kw["input_ids"]
        batches.append(kw)
        masks.append(enc["attention_mask"].bool() if "attention_mask" in enc else None)
    return CalibrationInputs(batches, f"{len(texts)} sentences of {named}, {per_pass} per pass "
                                      f"(padding not observed; tokenizer {type(tok).__name__}, at most {limit} "
                                      "tokens)", masks, len(texts))


# ----------------------------------------------------------------------------- diffusion models

@dataclass(frozen=True)
class Embedding:
    """One prompt's text conditioning from one encoder: its sequence [tokens, width], and pooled [width] or None."""

    sequence: torch.Tensor
    pooled: torch.Tensor | None


@dataclass(frozen=True)
class TextEncoder:
    """A text encoder's outputs over the prompt set (computed by ``collect``, which loads it)."""

    path: str
    architecture: str
    embeddings: list[Embedding]


def schedule(steps: int) -> tuple[float, ...]:
    """``steps`` timesteps (of 1000) at the middles of equal slices of (0, 1000), high noise first.

    >>> schedule(4)
    (875.0, 625.0, 375.0, 125.0)
    """
    if steps < 1:
        raise OptionsError(f"--steps {steps}: give at least one timestep")
    return tuple(1000.0 * (steps - i - 0.5) / steps for i in range(steps))


def diffusion_calibration_inputs(class_name: str, config, *, steps: int, seeds: int,
                                 encoders: tuple[TextEncoder, ...] = (), samples: int | None = None,
                                 path: str | None = None) -> CalibrationInputs:
    """One row per (seed, timestep), ``seeds`` x ``steps`` of them (capped at ``samples``), each seeded
    latents; the text conditioning of row i is prompt i of the encoders' outputs where an encoder's
    width matches the model's input, seeded otherwise. Rows are joined into passes of up to
    ``ROWS_PER_PASS`` (``collate``)."""
    from quantkit.diffusion_inputs import Shape, diffusion_inputs
    if seeds < 1:
        raise OptionsError(f"--seeds {seeds}: give at least one seed")
    tokens = _tokens(encoders)
    batches, where, fed = [], None, set()
    for i, (seed, t) in enumerate(itertools.product(range(seeds), schedule(steps))):
        if samples and i >= samples:
            break
        made = diffusion_inputs(class_name, config, seed, path=path, shape=Shape(1, (t,), tokens))
        kw, used, which = _condition(made.kwargs, encoders, i)
        where, fed = where or used, fed | which
        batches.append(kw)
    _refuse_unused(encoders, fed, class_name, made.kwargs if batches else {})
    rows, batches = len(batches), in_passes(batches, ROWS_PER_PASS)
    passes = f"{rows} rows in {len(batches)} pass{'es' if len(batches) > 1 else ''}"
    if "timestep" not in made.kwargs:             # the VAE: images, no timestep, no text
        return CalibrationInputs(batches, f"seeds 0-{seeds - 1} ({passes}): {made.words}", rows=rows)
    conditioning = "; ".join(where) if where else "seeded text embeddings"
    words = (f"seeds 0-{seeds - 1} x {steps} timesteps "
             f"({'/'.join(f'{t:g}' for t in schedule(steps))} of 1000), 1 x seeded latents each, {passes}; "
             f"text conditioning: {conditioning}")
    return CalibrationInputs(batches, words, rows=rows)


def in_passes(rows: list[dict], per_pass: int) -> list[dict]:
    """One-row keyword inputs joined ``per_pass`` at a time (``collate``); rows that do not join (a
    shape differs) stay one per pass."""
    out = []
    for i in range(0, len(rows), per_pass):
        group = rows[i:i + per_pass]
        joined = collate(group)
        out.extend([joined] if joined is not None else group)
    return out


def collate(rows: list):
    """Values of one-row inputs joined along the batch dimension: a tensor whose first dimension is 1
    in every row is concatenated, one equal in every row (FLUX's position ids) is shared, as is any
    other equal value; dicts are joined key by key. None when the rows cannot be joined.

    >>> collate([{"x": torch.ones(1, 2), "ids": torch.zeros(3, 2)}, {"x": torch.zeros(1, 2), "ids": torch.zeros(3, 2)}])["x"]
    tensor([[1., 1.],
            [0., 0.]])
    """
    first = rows[0]
    if isinstance(first, dict):
        if any(not isinstance(r, dict) or r.keys() != first.keys() for r in rows):
            return None
        out = {}
        for key in first:
            value = collate([r[key] for r in rows])
            if value is None:
                return None
            out[key] = value
        return out
    if torch.is_tensor(first):
        if any(not torch.is_tensor(r) or r.shape != first.shape or r.dtype != first.dtype for r in rows):
            return None
        if first.dim() >= 1 and first.shape[0] == 1:
            return torch.cat(rows, dim=0)
        return first if all(torch.equal(r, first) for r in rows) else None
    return first if all(r == first for r in rows) else None


def _tokens(encoders) -> int:
    from quantkit.diffusion_inputs import TEXT_TOKENS
    lengths = {e.embeddings[0].sequence.shape[0] for e in encoders if e.embeddings}
    return lengths.pop() if len(lengths) == 1 else TEXT_TOKENS


def _refuse_unused(encoders, fed: set[int], class_name: str, kw: dict) -> None:
    """An explicit --text-encoder that conditions nothing would be silently ignored: refuse it."""
    unused = [e for i, e in enumerate(encoders) if i not in fed]
    if not unused:
        return
    e = unused[0]
    first = e.embeddings[0]
    widths = f"sequence width {first.sequence.shape[-1]}" + (
        f", pooled width {first.pooled.shape[-1]}" if first.pooled is not None else "")
    inputs = ", ".join(f"{k} width {v.shape[-1]}" for k, v in
                       [*kw.items(), *kw.get("added_cond_kwargs", {}).items()]
                       if k in _TEXT_INPUTS and isinstance(v, torch.Tensor)) or "no text input"
    raise OptionsError(f"--text-encoder {e.path}: its {e.architecture} ({widths}) matches no text input of "
                       f"{class_name} ({inputs})",
                       hint="give the text encoder(s) this model was trained with, or leave --text-encoder out "
                            "(seeded text embeddings are used)")


_TEXT_INPUTS = ("encoder_hidden_states", "pooled_projections", "text_embeds")


def _condition(kw: dict, encoders, i: int) -> tuple[dict, list[str], set[int]]:
    """``kw`` with its text inputs (``encoder_hidden_states``: a sequence; ``pooled_projections`` or
    SDXL's ``text_embeds``: pooled) replaced by prompt ``i``'s embeddings where a width fits: one
    encoder's exactly, or all the encoders' of that kind concatenated in the order given (SDXL's
    two CLIPs). Returns the inputs, what was matched in words, and the indices of the encoders used."""
    if not encoders:
        return kw, [], set()
    kw, used, which = dict(kw), [], set()
    prompts = [e.embeddings[i % len(e.embeddings)] for e in encoders]
    names = [e.architecture for e in encoders]
    seq = kw.get("encoder_hidden_states")
    if seq is not None and seq.dim() == 3:
        found = _match(seq.shape[-1], [p.sequence for p in prompts], names)
        if found is not None and found[0].shape[0] == seq.shape[1]:
            kw["encoder_hidden_states"] = found[0][None].to(seq.dtype)
            used.append(f"encoder_hidden_states from {found[1]}")
            which |= set(found[2])
    pooled_at = ("pooled_projections", None) if "pooled_projections" in kw else \
        ("added_cond_kwargs", "text_embeds") if "text_embeds" in kw.get("added_cond_kwargs", {}) else None
    if pooled_at is not None:
        outer, inner = pooled_at
        old = kw[outer] if inner is None else kw[outer][inner]
        pooled = [p.pooled for p in prompts]
        have = [(j, t, n) for j, (t, n) in enumerate(zip(pooled, names)) if t is not None]
        found = _match(old.shape[-1], [t for _, t, _ in have], [n for _, _, n in have]) if have else None
        if found is not None:
            new = found[0][None].to(old.dtype)
            if inner is None:
                kw[outer] = new
            else:
                kw[outer] = {**kw[outer], inner: new}
            used.append(f"{inner or outer} from {found[1]} (pooled)")
            which |= {have[k][0] for k in found[2]}
    return kw, used, which


def _match(width: int, tensors: list[torch.Tensor], names: list[str]):
    """(tensor, its source in words, the positions in ``tensors`` used) of width ``width``: one of
    ``tensors``, or all concatenated; or None."""
    for k, (t, name) in enumerate(zip(tensors, names)):
        if t.shape[-1] == width:
            return t, name, (k,)
    if len(tensors) > 1 and sum(t.shape[-1] for t in tensors) == width \
            and len({t.shape[:-1] for t in tensors}) == 1:
        return torch.cat(tensors, dim=-1), " + ".join(names), tuple(range(len(tensors)))
    return None


# ----------------------------------------------------------------------------- user hook

def hook_inputs(spec: str, samples: int | None = None) -> CalibrationInputs:
    """The inputs ``module:function`` (or ``path/file.py:function``) returns: an iterable of keyword-input
    dicts, one per pass (the first ``samples`` of them: a generator may be endless then). Anything wrong
    with the hook is one ``OptionsError`` line (exit 2)."""
    function = _hook(spec)
    try:
        produced = function()
        batches = []
        for item in produced:
            if samples and len(batches) >= samples:
                break
            if not isinstance(item, dict) or not all(isinstance(k, str) for k in item):
                raise OptionsError(f"--inputs {spec}: item {len(batches)} is a {type(item).__name__}, not a dict of "
                                   "keyword inputs", hint="return an iterable of dicts such as {'input_ids': ...}")
            batches.append(item)
    except OptionsError:
        raise
    except Exception as exc:       # noqa: BLE001 - the user's code: any failure is bad input, in one line
        raise OptionsError(f"--inputs {spec} failed: {type(exc).__name__}: {str(exc).strip()[:200]}",
                           hint="fix the hook; it must return an iterable of keyword-input dicts") from None
    if not batches:
        raise OptionsError(f"--inputs {spec} returned no inputs", hint="return at least one dict of keyword inputs")
    return CalibrationInputs(batches, f"{len(batches)} passes from --inputs {spec}")


def _hook(spec: str):
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise OptionsError(f"--inputs {spec!r}: give 'builtin' or MODULE:FUNCTION (or path/file.py:FUNCTION)",
                           hint="e.g. --inputs my_inputs.py:calibration_batches")
    try:
        if module_name.endswith(".py") or os.sep in module_name:
            if not os.path.isfile(module_name):
                raise FileNotFoundError(f"no file {module_name}")
            loaded = importlib.util.spec_from_file_location("quantkit_user_inputs", module_name)
            module = importlib.util.module_from_spec(loaded)
            loaded.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except Exception as exc:       # noqa: BLE001 - importing the user's code runs it
        raise OptionsError(f"--inputs {spec}: cannot import {module_name} ({type(exc).__name__}: "
                           f"{str(exc).strip()[:200]})", hint="give an importable module or an existing .py file") \
            from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise OptionsError(f"--inputs {spec}: {module_name} has no function {attr}",
                           hint="name a function that returns the model inputs")
    return function


# ----------------------------------------------------------------------------- choosing and encoding

def model_inputs(model, source, settings, dtype: torch.dtype = torch.float32, progress=None) -> CalibrationInputs:
    """The calibration inputs for ``model`` (``models.build_model``'s ``Model`` of ``source``) as
    ``settings`` (``collect.CalibrationSettings``) ask: the user's hook, the sentence set (transformers
    models) or seeded latents over steps x seeds conditioned by the text encoders given (diffusers)."""
    folder = os.path.dirname(os.path.abspath(source.files[0]))
    if settings.inputs != BUILTIN:
        return hook_inputs(settings.inputs, settings.samples)
    probe = model.make()
    if model.transformers:
        if settings.text_encoders:
            raise OptionsError(f"--text-encoder conditions diffusion models; {model.architecture} is a transformers "
                               "model, calibrated on the built-in sentences", hint="leave --text-encoder out")
        return text_inputs(folder, probe, settings.samples)
    from quantkit.diffusion_inputs import supported
    if model.architecture not in supported():
        raise UnsupportedInputError(f"calibrate has no built-in inputs for the diffusers class {model.architecture} "
                                    f"(it feeds {', '.join(supported())})", path=folder,
                                    hint="pass --inputs module:function returning the model's inputs, or "
                                         "--weights-only")
    passes = settings.steps * settings.seeds if model.architecture != "AutoencoderKL" else settings.seeds
    count = min(passes, settings.samples or passes)
    _check_rows_fit(model.architecture, probe.config, count, folder, settings)
    encoders = tuple(encode_prompts(p, count, dtype) for p in settings.text_encoders)
    steps = settings.steps if model.architecture != "AutoencoderKL" else 1      # the VAE takes no timestep
    return diffusion_calibration_inputs(model.architecture, probe.config, steps=steps, seeds=settings.seeds,
                                        encoders=encoders, samples=settings.samples, path=folder)


def _check_rows_fit(class_name: str, config, rows: int, path: str, settings) -> None:
    """Refuse, before any work, more rows than the memory holds: every row's inputs (latents, text
    embeddings) are made before the model runs, so --steps 1000 --seeds 1000 on a real model would
    end in the kernel's out-of-memory killer, not in an error."""
    from quantkit.diffusion_inputs import Shape, diffusion_inputs
    from quantkit.workers import available_memory
    available = available_memory()
    if available is None:
        return
    one = diffusion_inputs(class_name, config, 0, path=path, shape=Shape(1, (schedule(1)[0],))).kwargs
    row = _nbytes(one)
    budget = available // 2           # the model's own blocks and the observers need the rest
    if row * rows <= budget:
        return
    fit = max(1, budget // max(row, 1))
    raise OptionsError(f"--steps {settings.steps} x --seeds {settings.seeds}: {rows} calibration rows of "
                       f"{row / 1e6:.1f} MB need {row * rows / 1e9:.1f} GB; {available / 1e9:.1f} GB of memory is "
                       f"available", hint=f"give fewer --steps / --seeds, or --samples {min(fit, rows - 1)} or fewer")


def _nbytes(value) -> int:
    """The bytes of the tensors in a (nested) keyword-input value."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


def encode_prompts(path: str, count: int, dtype: torch.dtype = torch.float32) -> TextEncoder:
    """The first ``count`` sentences of the set (cycled) through the transformers text encoder in
    folder ``path`` (config.json, weights, and its tokenizer beside them or in the pipeline's matching
    ``tokenizer*`` folder), loaded streamed by the runtime, each padded to ``PROMPT_TOKENS`` tokens as
    pipelines pad: its sequence (last hidden states) and pooled output (CLIP's; None for T5)."""
    from quantkit.models import build_model, streamed
    from quantkit.sources import open_source
    if not os.path.isdir(path):
        raise OptionsError(f"--text-encoder {path}: not a folder",
                           hint="give a transformers text encoder folder (config.json, weights, tokenizer)")
    with open_source(path) as source:
        model = build_model(source, with_inputs=False)
        if not model.transformers:
            raise OptionsError(f"--text-encoder {path}: {model.architecture} is not a transformers text encoder",
                               hint="give a CLIP or T5 text encoder folder")
        tok = load_tokenizer(_tokenizer_folder(path), f"--text-encoder {path}")
        texts = list(itertools.islice(itertools.cycle(sentences()), count))
        with streamed(model, source, path, dtype) as module:
            limit = min(PROMPT_TOKENS, int(getattr(module.config, "max_position_embeddings", 0) or PROMPT_TOKENS))
            try:
                embeddings = [_encode(module, tok, text, limit) for text in texts]
            except (RuntimeError, ValueError, TypeError, IndexError, AttributeError) as exc:
                raise UnsupportedInputError(f"the text encoder does not encode the prompts ({type(exc).__name__}: "
                                            f"{str(exc).strip()[:200]})", path=path,
                                            hint="give a CLIP or T5 text encoder folder") from None
    return TextEncoder(path, model.architecture, embeddings)


def _encode(module, tok, text: str, limit: int) -> Embedding:
    """One prompt padded to ``limit`` tokens through a text encoder: last hidden states, and the pooled
    output where the model has one (CLIPTextModelWithProjection's text_embeds, CLIPTextModel's pooler)."""
    enc = tok(text, return_tensors="pt", padding="max_length", truncation=True, max_length=limit)
    with torch.no_grad():
        out = module(input_ids=enc["input_ids"])
    pooled = getattr(out, "text_embeds", None)
    pooled = getattr(out, "pooler_output", None) if pooled is None else pooled
    return Embedding(out.last_hidden_state[0].float().clone(), None if pooled is None else pooled[0].float().clone())


def _tokenizer_folder(path: str) -> str:
    """Where the tokenizer of the text encoder in ``path`` is: beside it, or, in a diffusers pipeline
    folder, the sibling ``tokenizer`` folder matching ``text_encoder`` / ``_2`` / ``_3``."""
    name = os.path.basename(os.path.normpath(path))
    sibling = os.path.join(os.path.dirname(os.path.normpath(path)), name.replace("text_encoder", "tokenizer"))
    has_own = any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json",
                                                                 "vocab.json", "spiece.model", "vocab.txt"))
    return path if has_own or not name.startswith("text_encoder") or not os.path.isdir(sibling) else sibling
