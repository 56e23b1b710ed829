"""Held-out evaluation: fidelity figures per input, on inputs calibration never saw.

One output-level figure over a few inputs is fragile: its minimum is set by whichever input is
hardest (on MiniLM, the 3-4 token sentences), so a comparison of two configurations can flip
with the inputs chosen. This runs the source model and a quantized output on a fixed held-out
set and reports, per input, the cosine of the outputs and their SQNR, summarized as mean, a low
percentile (p5, p1) and min, with the spread of those figures over disjoint seeded subsets of the
inputs (``runs``): a difference smaller than that spread is noise.

- transformers models: ``data/heldout.txt`` of the calibration package (72 sentences of 1 to 40+
  words: 3-4 token inputs, prose, prompts, 12 languages, code, numbers; none of them in the
  calibration set), each its own input, padded on the right with an attention mask. Per input: the
  cosine of the mean-pooled output over its real tokens (a sentence embedding, as
  sentence-transformers pools) and the SQNR of its output at those tokens.
- diffusers models: seeded latents, timesteps and text embeddings from seeds ``HELDOUT_SEED`` on
  (calibration uses seeds from 0, ``validate --model-output`` seed 0), one input per seed with a
  seeded timestep in (0, 1000); per input: cosine and SQNR of its output row.

Both models run streamed by ``quantkit.runtime`` (one block in memory at a time), in float32 by
default, weight-only or with FP8 activations simulated (``activations`` as the runtime takes it).

>>> heldout_fidelity(source, "out.safetensors")["cosine"]["min"]      # doctest: +SKIP
"""
from __future__ import annotations

import math
from importlib import resources

from .errors import UnsupportedInputError
from .models import Model, build_model, config_folder, streamed

HELDOUT_SEED = 1000       # the first diffusion seed held out (calibration: 0, 1, ...; validate: 0)
DIFFUSION_INPUTS = 24     # seeded diffusion inputs
ROWS_PER_PASS = 24        # inputs per forward pass (streamed mode reads the model once per pass)
RUNS = 3                  # seeded subsets the spread is measured over
PERCENTILES = (5, 1)


def heldout_sentences() -> list[str]:
    """The held-out sentence set, one per non-empty line.

    >>> len(heldout_sentences()) >= 64
    True
    """
    text = resources.files("quantkit.calibration").joinpath("data/heldout.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def percentile(values, q: float) -> float:
    """The ``q``-th percentile of ``values`` by linear interpolation between order statistics
    (numpy's default, ``method="linear"``).

    >>> percentile([1.0, 2.0, 3.0, 4.0, 5.0], 5)
    1.2
    """
    xs = sorted(float(v) for v in values)
    if not xs:
        raise ValueError("no values")
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(values) -> dict:
    """{"n", "mean", "p5", "p1", "min"} of per-input figures (an infinite SQNR, an exact output,
    counts as infinite: the mean is then infinite too, the low figures are not).

    >>> summarize([0.5, 1.0])
    {'n': 2, 'mean': 0.75, 'p5': 0.525, 'p1': 0.505, 'min': 0.5}
    """
    xs = [float(v) for v in values]
    return {"n": len(xs), "mean": math.fsum(xs) / len(xs) if xs else math.nan,
            **{f"p{q}": percentile(xs, q) for q in PERCENTILES}, "min": min(xs)}


def spread(summaries: list[dict]) -> dict:
    """Figure -> [lowest, highest] over the runs' summaries."""
    return {k: [min(s[k] for s in summaries), max(s[k] for s in summaries)] for k in summaries[0] if k != "n"}


def heldout_fidelity(source, output: str, *, compute_dtype: str = "fp32", activations: str = "none",
                     runs: int = RUNS, max_memory: int | None = None) -> dict:
    """Per-input fidelity of ``output`` (a quantized file or folder) to ``source`` (an opened
    checkpoint with its config.json) on the held-out inputs: {"inputs", "activations", "cosine",
    "sqnr" (each ``summarize``d over every input), "runs" (the same over ``runs`` disjoint seeded
    subsets of the inputs: the figures of a set a third as large), "spread" (figure -> [lowest,
    highest] over the runs), "worst" (the 5 inputs of least cosine)}."""
    import torch

    from .comfy_names import RenamedView
    original = source.original if isinstance(source, RenamedView) else source
    model = build_model(original, with_inputs=False)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[compute_dtype]
    if model.transformers:
        labels, passes, words = _text_inputs(original, model)
    else:
        labels, passes, words = _diffusion_inputs(original, model)
    ref = _outputs(model, original, source.path, passes, dtype, "none", max_memory)
    out = _outputs(model, output, output, passes, dtype, activations, max_memory)
    cosines, sqnrs = [], []
    for (y_ref, mask), (y, _) in zip(ref, out):
        c, s = _per_input(y_ref, y, mask)
        cosines += c
        sqnrs += s
    order = torch.randperm(len(cosines), generator=torch.Generator().manual_seed(0)).tolist()
    subsets = [order[r::runs] for r in range(runs) if order[r::runs]]     # disjoint, seeded
    per_run = [{"cosine": summarize([cosines[i] for i in idx]), "sqnr": summarize([sqnrs[i] for i in idx])}
               for idx in subsets]
    worst = sorted(range(len(cosines)), key=lambda i: cosines[i])[:5]
    return _finite({"inputs": words, "activations": activations, "compute_dtype": compute_dtype,
            "cosine": summarize(cosines), "sqnr": summarize(sqnrs), "runs": per_run,
            "spread": {k: spread([r[k] for r in per_run]) for k in ("cosine", "sqnr")},
            "spread_over": f"{len(subsets)} disjoint seeded subsets of the {len(cosines)} inputs",
            "worst": [{"input": labels[i], "cosine": cosines[i], "sqnr": sqnrs[i]} for i in worst]})


def _finite(doc):
    """``doc`` with infinite figures (an input the quantization left exact) as None, as JSON takes them."""
    if isinstance(doc, dict):
        return {k: _finite(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_finite(v) for v in doc]
    return None if isinstance(doc, float) and not math.isfinite(doc) else doc


def _text_inputs(source, model: Model):
    """The held-out sentences, tokenized by the tokenizer beside the model, ``ROWS_PER_PASS`` a pass."""
    from .calibration.inputs import text_inputs
    texts = heldout_sentences()
    made = text_inputs(config_folder(source), model.make(), per_pass=ROWS_PER_PASS, texts=texts,
                       named="quantkit's held-out set (heldout.txt, none in the calibration set)")
    return texts, list(zip(made.batches, made.masks)), made.words


def _diffusion_inputs(source, model: Model):
    """Seeded inputs from ``HELDOUT_SEED`` on, one timestep each drawn in (0, 1000)."""
    import torch

    from .calibration.inputs import collate
    from .diffusion_inputs import TEXT_TOKENS, Shape, check_supported, diffusion_inputs
    folder = config_folder(source)
    check_supported(model.architecture, folder)
    config = model.make().config
    gen = torch.Generator().manual_seed(HELDOUT_SEED)
    rows, labels = [], []
    for i in range(DIFFUSION_INPUTS):
        seed, t = HELDOUT_SEED + i, round(float(torch.rand((), generator=gen)) * 980 + 10, 1)
        made = diffusion_inputs(model.architecture, config, seed, path=folder, shape=Shape(1, (t,), TEXT_TOKENS))
        rows.append({**made.kwargs, "return_dict": False})
        labels.append(f"seed {seed}, timestep {t:g}" if "timestep" in made.kwargs else f"seed {seed}")
    passes = []
    for i in range(0, len(rows), ROWS_PER_PASS):
        group = rows[i:i + ROWS_PER_PASS]
        joined = collate(group)
        passes.extend([(joined, None)] if joined is not None else [(r, None) for r in group])
    words = f"{DIFFUSION_INPUTS} seeded inputs (seeds {HELDOUT_SEED}-{HELDOUT_SEED + DIFFUSION_INPUTS - 1}, " \
            f"seeded timesteps; calibration uses seeds from 0, validate --model-output seed 0)"
    return labels, passes, words


def _outputs(model: Model, weights, path: str, passes, dtype, activations: str, max_memory) -> list:
    """(output, mask) per pass: ``model`` loaded from ``weights`` once, run on every pass."""
    import torch
    results = []
    with streamed(model, weights, path, dtype, activations, max_memory) as module, torch.no_grad():
        for kw, mask in passes:
            inputs = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kw.items()}
            try:
                y = model.output(module(**inputs))
            except (RuntimeError, ValueError, TypeError, IndexError) as exc:
                raise UnsupportedInputError(f"{model.architecture} does not run on the held-out inputs "
                                            f"({type(exc).__name__}: {str(exc).strip()[:200]})", path=path) from exc
            rows = next(v for v in kw.values() if torch.is_tensor(v) and v.dim() >= 1).shape[0]
            if y.dim() == 0 or y.shape[0] != rows:
                raise UnsupportedInputError(f"{model.architecture}'s output has no row per input "
                                            f"(shape {list(y.shape)} for {rows} inputs)", path=path,
                                            hint="compare it with validate --model-output (without --heldout)")
            results.append((y.detach().float().clone(), mask))
    return results


def _per_input(y_ref, y, mask) -> tuple[list[float], list[float]]:
    """Per row: cosine of the outputs (of their mean over the real tokens, for token outputs) and
    SQNR of the outputs at the real tokens (dB; inf where they are equal)."""
    import torch
    cosines, sqnrs = [], []
    for i in range(y_ref.shape[0]):
        a, b = y_ref[i].double(), y[i].double()
        if mask is not None and a.dim() >= 1 and a.shape[0] == mask.shape[1]:
            keep = mask[i]
            a, b = a[keep], b[keep]
            ea, eb = a.mean(0).reshape(-1), b.mean(0).reshape(-1)
        else:
            ea, eb = a.reshape(-1), b.reshape(-1)
        norms = float(ea.norm() * eb.norm())
        cosines.append(float(ea @ eb) / norms if norms > 0 else float(torch.equal(ea, eb)))
        noise = float((a - b).pow(2).sum())
        sqnrs.append(10 * math.log10(float(a.pow(2).sum()) / noise) if noise > 0 else math.inf)
    return cosines, sqnrs
