"""Reports people look at: ``report.json``, PNG charts and a short ``report.md`` that embeds them.

``validate --report DIR`` charts every tensor's SQNR in file order (the model's depth), FP8 and
kept tensors told apart, with the ``--min-sqnr`` bar, and the model's output when it was
measured; ``sensitivity --report DIR`` charts the ranking, the proposed keep list marked, with
the target and the all-FP8 output. The folder is built under a temporary name and renamed into
place when complete. Charts need matplotlib (``pip install 'quantkit[report]'``).
"""
from __future__ import annotations

import json
import math
import os
import re

from .errors import UnsupportedInputError
from .writer import TempFolder

REPORT = "report.md"
DATA = "report.json"


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UnsupportedInputError("--report draws charts with matplotlib, which is not installed",
                                    hint="pip install 'quantkit[report]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")          # files only: no display, whatever the environment says
    import matplotlib.pyplot as plt
    return plt


def _num(v, spec: str) -> str:
    """A metric for a table: formatted, or "exact" for an infinite SQNR/PSNR (no error; null in JSON)."""
    return format(v, spec) if _finite(v) is not None else "exact"


def _finite(v) -> float | None:
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None


def validation_report(report, folder: str) -> list[str]:
    """Write ``folder`` for a ``ValidationReport``; returns the files written."""
    plt = _pyplot()
    doc = report.to_dict()
    with TempFolder(folder) as tmp:
        files = [DATA, "tensors.png"]
        _write_json(os.path.join(tmp.path, DATA), doc)
        _tensor_chart(plt, report, os.path.join(tmp.path, "tensors.png"))
        if report.model_output:
            files.append("model_output.png")
            _output_chart(plt, report.model_output, os.path.join(tmp.path, "model_output.png"))
        _write_text(os.path.join(tmp.path, REPORT), _validation_md(report, files))
        tmp.commit()
    return [REPORT, *files]


def sensitivity_report(report, folder: str) -> list[str]:
    """Write ``folder`` for a ``SensitivityReport``; returns the files written."""
    plt = _pyplot()
    with TempFolder(folder) as tmp:
        _write_json(os.path.join(tmp.path, DATA), report.to_dict())
        _ranking_chart(plt, report, os.path.join(tmp.path, "sensitivity.png"))
        _write_text(os.path.join(tmp.path, REPORT), _sensitivity_md(report))
        tmp.commit()
    return [REPORT, DATA, "sensitivity.png"]


def stats_report(stats, rows: list[dict], folder: str) -> list[str]:
    """Write ``folder`` for a stats file (``calibration.stats.Stats``) and its rows
    (``calibration.collect.layer_table``); returns the files written."""
    plt = _pyplot()
    with TempFolder(folder) as tmp:
        _write_json(os.path.join(tmp.path, DATA), {**stats.describe(), "source": stats.source, "layers": rows})
        _ranges_chart(plt, stats, rows, os.path.join(tmp.path, "ranges.png"))
        _write_text(os.path.join(tmp.path, REPORT), _stats_md(stats, rows))
        tmp.commit()
    return [REPORT, DATA, "ranges.png"]


def _write_json(path: str, doc: dict) -> None:
    _write_text(path, json.dumps(doc, indent=2, allow_nan=False) + "\n")


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


# ----------------------------------------------------------------------------- charts

def _tensor_chart(plt, report, path: str) -> None:
    """Per-tensor SQNR against the tensor's position in the file (the model's depth); an exact
    (lossless) tensor is drawn at the top edge."""
    compared = [t for t in report.tensors if t.stored != "bytes"]
    finite = [t.sqnr for t in compared if math.isfinite(t.sqnr)]
    top = (max(finite) if finite else 60.0) + 5
    fig, ax = plt.subplots(figsize=(11, 4.5), dpi=110)
    for stored, marker, color, label in (("fp8", "o", "tab:blue", "FP8"), ("float", "s", "tab:gray", "kept")):
        xs = [i for i, t in enumerate(compared) if t.stored == stored]
        ys = [min(t.sqnr, top) for t in compared if t.stored == stored]
        if xs:
            ax.scatter(xs, ys, s=14, marker=marker, color=color, label=f"{label} ({len(xs)})")
    if report.min_sqnr is not None:
        ax.axhline(report.min_sqnr, color="tab:red", linestyle="--", linewidth=1, label=f"--min-sqnr {report.min_sqnr:g}")
    ax.set_xlabel("tensor, in file order (depth)")
    ax.set_ylabel("SQNR (dB); lossless at the top edge")
    ax.set_ylim(bottom=max(0.0, min(finite, default=0.0) - 5), top=top + 2)
    ax.set_title(f"Per-tensor SQNR: {os.path.basename(report.output)} against {report.against}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _output_chart(plt, m: dict, path: str) -> None:
    """The model's output, source vs quantized: SQNR and cosine side by side, one bar per row
    (weight-only, then the simulated W8A8 rows when they were measured)."""
    rows = m.get("rows") or [{"row": m.get("architecture", "model"), "sqnr": m.get("sqnr"), "cosine": m.get("cosine")}]
    names = [r["row"] for r in rows][::-1]
    sqnr = [_finite(r.get("sqnr")) or 0.0 for r in rows][::-1]
    gap = [max(1 - (_finite(r.get("cosine")) or 0.0), 1e-12) for r in rows][::-1]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 2.6 + 0.35 * len(rows)), dpi=110)
    a.barh(names, sqnr, color="tab:blue")
    a.set_xlabel("output SQNR (dB)")
    for i, v in enumerate(sqnr):
        a.text(v, i, f" {v:.2f} dB", va="center")
    a.set_xlim(0, max(max(sqnr) * 1.3, 10))
    b.barh(names, gap, color="tab:orange")
    b.set_xscale("log")
    b.set_xlabel("1 - cosine (log)")
    for i, v in enumerate(gap):
        b.text(v, i, f" cosine {1 - v:.6f}", va="center")
    fig.suptitle(f"Model output ({m.get('inputs', '')})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _ranking_chart(plt, report, path: str, most: int = 40) -> None:
    layers = report.layers[:most]
    keep = set(report.keep or ())
    fig, ax = plt.subplots(figsize=(10, max(3.0, 0.28 * len(layers) + 1.2)), dpi=110)
    names = [layer.name for layer in layers][::-1]
    values = [_finite(layer.sqnr) or 0.0 for layer in layers][::-1]
    colors = ["tab:red" if layer.name in keep else "tab:blue" for layer in layers][::-1]
    ax.barh(range(len(layers)), values, color=colors)
    ax.set_yticks(range(len(layers)), names, fontsize=7)
    if _finite(report.all_sqnr) is not None:
        ax.axvline(report.all_sqnr, color="black", linestyle=":", linewidth=1,
                   label=f"all {len(report.layers)} in FP8: {report.all_sqnr:.1f} dB")
    if report.target_sqnr is not None:
        ax.axvline(report.target_sqnr, color="tab:red", linestyle="--", linewidth=1,
                   label=f"target {report.target_sqnr:g} dB ({len(keep)} kept, red)")
    ax.set_xlabel("model output SQNR with this layer alone in FP8 (dB); shorter bar = more sensitive")
    ax.set_title(f"Sensitivity of {report.source} ({report.architecture}), worst {len(layers)} of {len(report.layers)}")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _ranges_chart(plt, stats, rows: list[dict], path: str) -> None:
    """Every layer's weight and input range (log scale) in name order, and their outlier ratios."""
    rows = sorted(rows, key=lambda r: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", r["tensor"])])
    xs = range(len(rows))
    fig, (a, b) = plt.subplots(2, 1, figsize=(11, 6.5), dpi=110, sharex=True)
    for key, color, label in (("weight_range", "tab:blue", f"weight ({stats.weight_observer})"),
                              ("input_range", "tab:orange", f"input ({stats.activation_observer})")):
        pts = [(i, r[key]) for i, r in zip(xs, rows) if _finite(r[key]) and r[key] > 0]
        if pts:
            a.scatter([p[0] for p in pts], [p[1] for p in pts], s=14, color=color, label=label)
    a.set_yscale("log")
    a.set_ylabel("range (absmax-like)")
    a.set_title(f"Per-layer ranges: {stats.source.get('name', '?')}, {len(rows)} layers, {stats.samples} passes")
    a.grid(alpha=0.3)
    a.legend(loc="upper right", fontsize=8)
    for key, color, label in (("weight_outlier", "tab:blue", "weight"), ("input_outlier", "tab:orange", "input")):
        pts = [(i, r[key]) for i, r in zip(xs, rows) if _finite(r[key])]
        if pts:
            b.scatter([p[0] for p in pts], [p[1] for p in pts], s=14, color=color, label=label)
    b.set_ylabel("outlier ratio (absmax / RMS)")
    b.set_xlabel("layer, in name order (block numbers as numbers: the depth)")
    b.grid(alpha=0.3)
    b.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------- report.md

def _validation_md(report, files: list[str]) -> str:
    s = report.summary()
    lines = [f"# Validation of {report.output}", "",
             f"**{'PASS' if report.ok else 'FAIL'}**" + (f" against {report.against}" if report.against else ""), ""]
    if report.hashes:
        lines += ["| file | role | sha256 | ok |", "|---|---|---|---|"]
        lines += [f"| {h['file']} | {h['role']} | `{h['actual']}` | {'yes' if h['ok'] else 'NO'} |" for h in report.hashes]
        lines.append("")
    if s["sqnr_db"]:
        lines.append(f"{s['tensors']} tensors compared, {s['quantized']} FP8: SQNR min {s['sqnr_db']['min']:.2f} dB, "
                     f"median {s['sqnr_db']['median']:.2f} dB; cosine min {s['cosine']['min']:.6f}.")
        lines.append("")
    lines += ["![per-tensor SQNR](tensors.png)", ""]
    m = report.model_output
    if m:
        lines += [f"Model output ({m['architecture']}, {m['inputs']}; loaded by {m['loaded_by']}): SQNR "
                  f"{m['sqnr']:.2f} dB, cosine {m['cosine']:.6f}, relative L2 error {m['rel_l2']:.4f}.", ""]
        rows = m.get("rows") or []
        if len(rows) > 1:
            lines += ["| row | SQNR (dB) | PSNR (dB) | cosine | what | loaded by |", "|---|---:|---:|---:|---|---|"]
            lines += [f"| {r['row']} | {_num(r['sqnr'], '.2f')} | {_num(r['psnr'], '.2f')} | {_num(r['cosine'], '.6f')} "
                      f"| {r['what']}{' (= weight-only: the file quantizes no input)' if r.get('same_as') else ''} "
                      f"| {r['loaded_by']} |" for r in rows]
            lines.append("")
        lines += ["![model output](model_output.png)", ""]
    if report.failures:
        lines += ["## Problems", ""] + [f"- {f}" for f in report.failures] + [""]
    lines.append(f"Data: [{DATA}]({DATA}).")
    return "\n".join(lines) + "\n"


def _sensitivity_md(report) -> str:
    lines = [f"# Sensitivity of {report.source}", "",
             f"{report.architecture}, {report.inputs}; recipe {report.recipe}; {len(report.layers)} layers, each "
             f"quantized alone. All in FP8: output SQNR {report.all_sqnr:.2f} dB.", ""]
    if report.keep is not None:
        verdict = "meets" if report.target_met else "does not meet"
        rules = " ".join(f"--keep '{name}'" for name in report.keep) or "(none)"
        lines += [f"To reach {report.target_sqnr:g} dB keep {len(report.keep)} layer(s): output SQNR "
                  f"{report.keep_sqnr:.2f} dB ({verdict} the target).", "", f"    {rules}", ""]
    lines += ["![ranking](sensitivity.png)", "", "| rank | layer | kind | output SQNR alone (dB) |",
              "|---:|---|---|---:|"]
    lines += [f"| {i} | {c.name} | {c.kind} | {c.sqnr:.2f} |" for i, c in enumerate(report.layers, 1)]
    lines += ["", f"Data: [{DATA}]({DATA})."]
    return "\n".join(lines) + "\n"


def _stats_md(stats, rows: list[dict]) -> str:
    def num(v):
        return "-" if v is None else f"{v:.4g}"
    lines = [f"# Calibration statistics of {stats.source.get('name', '?')}", "",
             f"Source SHA256 `{stats.source_sha256}`. Weights: {len(stats.weights)} ({stats.weight_observer}, "
             f"{stats.granularity.value} scales). Inputs: {len(stats.activations)} layers "
             f"({stats.activation_observer or 'none'}) over {stats.samples} passes: {stats.inputs or '-'}.", "",
             "![per-layer ranges](ranges.png)", "",
             "| layer | input range | input outlier | weight range | weight outlier |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['tensor']} | {num(r['input_range'])} | {num(r['input_outlier'])} | {num(r['weight_range'])} | "
              f"{num(r['weight_outlier'])} |" for r in rows]
    lines += ["", f"Data: [{DATA}]({DATA})."]
    return "\n".join(lines) + "\n"
