"""What the commands print: each result rendered for a terminal, one function per result.

The commands call the library and hand its result here; nothing here computes or decides.
"""
from __future__ import annotations

import json

import click

NAME_COLUMN_MAX = 72


def size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def cells(text: str) -> int:
    """Terminal cells ``text`` takes: East Asian wide and full-width characters take two,
    combining marks none."""
    import unicodedata
    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1
               for c in text)


def pad(text: str, width: int) -> str:
    text = printable(text)
    return text + " " * max(width - cells(text), 0)


def printable(text: str) -> str:
    """A name from a file, safe for a terminal: control characters (newlines, escape sequences)
    shown as escapes."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def num(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}g}" if digits > 1 else f"{v:.1f}"


def shell(text: str) -> str:
    import shlex
    return shlex.quote(text)


def write_json(path: str, doc: dict) -> None:
    from ..writer import write_atomic
    from .options import JSON_STREAM, STDOUT
    text = json.dumps(doc, indent=2, allow_nan=False) + "\n"
    if path == STDOUT:
        stream = click.get_current_context().meta[JSON_STREAM]
        stream.write(text)
        stream.flush()
        return
    write_atomic(path, text.encode())


def charts(kind: str, report, path: str) -> None:
    """Write the --report folder ``path`` (``quantkit.report``'s ``kind``) and say what it holds."""
    from .. import report as charts_of
    report_folder(path, getattr(charts_of, kind)(report, path))


def report_folder(path: str, files: list[str]) -> None:
    click.echo(f"  report: {path}/ ({', '.join(files)})")


# ----------------------------------------------------------------------------- convert, plan, presets, formats

def conversion(result, keep_dtype: str) -> None:
    c = result.counts
    for note in result.notes:
        click.echo(f"  {note}")
    click.echo(f"  format {result.format}, recipe {result.recipe}, {result.fp8}, {result.granularity} scales")
    if result.stats is not None:
        click.echo(f"  stats {result.stats['file']}: weight ranges ({result.stats['weight_observer']}) for "
                   f"{result.stats['weight_scales']} tensors, static input scales for {result.stats['input_scales']}")
    click.echo(f"  tensors: {c['quantize']} quantized, {c['keep']} kept ({keep_dtype}), {c['pass']} passed through")
    click.echo(f"  size: {size(result.bytes_in)} -> {size(result.bytes_out)} "
               f"({100 * result.bytes_out / max(result.bytes_in, 1):.0f}%)")
    click.echo(f"  time: {result.seconds:.2f} s ({result.gb_per_s:.2f} GB/s)")
    click.echo(f"  sha256 {result.output_sha256}  (manifest {result.manifest})")


def source_plan(sp, only: str | None) -> None:
    """``quantkit plan``: a ``SourcePlan``'s table, one tensor a line, then its totals."""
    from ..policy import Action
    p, joined = sp.plan, sp.joined
    for note in p.notes:
        click.echo(note)
    # The name column fits the names (in terminal cells: wide characters take two), up to a cap
    # past which a longer name only pushes its own line: names are never cut, so they can be pasted.
    width = min(max((cells(printable(t.name)) for t in p.tensors), default=10), NAME_COLUMN_MAX)
    click.echo(f"{pad('tensor', width)}  {'shape':<16} {'dtype':<5} -> {'action':<8} {'out':<8} reason")
    for t in p.tensors:
        if only and t.action.value != only:
            continue
        shape = "x".join(map(str, t.info.shape)) or "scalar"
        origin = f" [= {' + '.join(joined[t.name])}]" if t.name in joined else ""
        calibrated = f" (stats: input range {t.input_range:.4g})" if t.input_range is not None else ""
        click.echo(f"{pad(t.name, width)}  {shape:<16} {t.info.dtype.code:<5} -> {t.action.value:<8} "
                   f"{t.out_dtype.code:<8} {t.decision.reason}{calibrated}{origin}")
    click.echo(f"\n{p.count(Action.QUANTIZE)} quantized, {p.count(Action.KEEP)} kept, "
               f"{p.count(Action.PASS)} passed through; size {size(p.bytes_in)} -> {size(p.bytes_out)}"
               f" ({100 * p.bytes_out / max(p.bytes_in, 1):.0f}%), recipe {sp.options.recipe.value}")
    click.echo("by recipe: " + ", ".join(f"{name} {size(n)} ({100 * n / max(p.bytes_in, 1):.0f}%)"
                                         if n is not None else f"{name} not possible" for name, n in sp.sizes.items()))
    if p.stats is not None:
        click.echo(f"stats {p.stats['file']}: weight ranges for {p.stats['weight_scales']} of {len(p.quantized())} "
                   f"quantized tensors, input ranges for {p.stats['input_scales']}")
    for w in [*sp.warnings, *p.warnings]:
        click.echo(f"warning: {w}", err=True)


def preset_list(registry: dict) -> None:
    click.echo(f"{'auto':<22} detect the architecture from the checkpoint's keys (default)")
    for name, p in registry.items():
        click.echo(f"{name:<22} {p.summary}")
    click.echo("\nThe summaries say what --recipe compact quantizes; --recipe mixed (the default) keeps the "
               "attention projections in BF16 (docs/presets.md).")


def preset(p) -> None:
    click.echo(f"{p.name}: {p.summary}")
    if p.detection:
        click.echo(f"\nRecognised by --preset auto: {p.detection}")
    if p.quantizes:
        click.echo("\nQuantized to FP8 beyond the default policy's linear layers:")
        for what, why in p.quantizes:
            click.echo(f"  - {what}: {why}")
    click.echo("\nKept in high precision:")
    for what, why in p.keeps:
        click.echo(f"  - {what}: {why}")
    if p.attention:
        click.echo("\nAttention projections it recognises (kept in BF16 by --recipe mixed, the default; FP8 with "
                   f"--recipe compact):\n  {p.attention}")
    if p.reference:
        click.echo(f"\nCompared with published FP8 files: {p.reference}")


def format_list(registry: dict) -> None:
    for name, cls in sorted(registry.items()):
        click.echo(f"{name:<20} {cls.summary}")


# ----------------------------------------------------------------------------- validate, sensitivity

def validation(report, show: int) -> None:
    """``quantkit validate``: hashes, notes, the per-tensor figures, the model's output, the verdict."""
    for h in report.hashes:
        click.echo(f"  sha256 {h['role']}: {'OK' if h['ok'] else 'MISMATCH'}  {h['actual']}  {h['file']}")
    for note in report.notes:
        click.echo(f"  note: {note}")
    s = report.summary()
    if report.tensors:
        click.echo(f"  tensors compared: {s['tensors']} ({s['quantized']} FP8)")
        if s["sqnr_db"]:
            click.echo(f"  FP8 tensors: SQNR min {s['sqnr_db']['min']:.2f} dB, median {s['sqnr_db']['median']:.2f} dB;"
                       f" PSNR min {s['psnr_db']['min']:.2f} dB; cosine min {s['cosine']['min']:.6f}")
        if report.rounding:
            r = report.rounding
            click.echo(f"  rounding: gptq ({r.get('gptq_tensors')} tensor(s), damping {r.get('percdamp')}, act-order "
                       f"{'on' if r.get('act_order') else 'off'}): weight SQNR is lower than nearest's by design, "
                       "the layers' outputs are closer (--model-output measures them)")
        bar = report.floor()
        if bar["rule"] == "min-sqnr":
            click.echo(f"  bar: --min-sqnr {bar['db']:g} dB for every tensor")
        elif bar["db"] is not None:
            click.echo(f"  sanity floor: {bar['what']} (lowest {bar['db']:.1f} dB)")
        worst = report.lowest(show)            # --show N: as many as asked (the JSON summary keeps 5)
        if worst:
            click.echo("  lowest SQNR:")
            for name, v in worst:
                click.echo(f"    {v:8.2f} dB  {name}")
    m = report.model_output
    if m:
        click.echo(f"  model output ({m['architecture']}, {m['inputs']}; output loaded by {m['loaded_by']}): "
                   f"SQNR {m['sqnr']:.2f} dB, cosine {m['cosine']:.6f}, relative L2 error {m['rel_l2']:.4f}")
        _output_rows(m.get("rows") or [])
        if m.get("heldout"):
            _heldout(m["heldout"])
    jobs = f", {report.jobs} processes, peak RSS {report.workers_peak_rss_bytes / 1e9:.2f} GB together" \
        if report.jobs > 1 else ""
    if report.ok:
        click.echo(f"  PASS ({report.seconds:.2f} s{jobs})")
    else:
        click.echo(f"  FAIL: {len(report.failures)} problem(s)")
        for f in report.failures[:20]:
            click.echo(f"    {f}")
        if len(report.failures) > 20:
            click.echo(f"    ... and {len(report.failures) - 20} more (see --json)")


def _heldout(h: dict) -> None:
    """validate --heldout: per-input cosine and SQNR over the held-out set, with their spread."""
    click.echo(f"  held-out ({h['inputs']}), per input, weight-only; [spread over {h['spread_over']}]:")
    for key, fmt in (("cosine", "{:.6f}"), ("sqnr", "{:.2f}")):
        s, sp = h[key], h["spread"][key]
        figures = ", ".join(f"{k} {num_or(fmt, s[k])} [{num_or(fmt, sp[k][0])}-{num_or(fmt, sp[k][1])}]"
                            for k in ("mean", "p5", "p1", "min"))
        click.echo(f"    {'cosine' if key == 'cosine' else 'SQNR dB':<8} {figures}")
    click.echo("    worst: " + "; ".join(f"{printable(w['input'])[:40]!r} {num_or('{:.6f}', w['cosine'])}"
                                         for w in h["worst"][:3]))


def num_or(fmt: str, v) -> str:
    return "inf" if v is None else fmt.format(v)


def _output_rows(rows: list[dict]) -> None:
    """The model output's rows side by side: weight-only and the simulated W8A8 ones."""
    if len(rows) < 2:
        return
    click.echo(f"    {'row':<12} {'SQNR dB':>8} {'PSNR dB':>8} {'cosine':>9}  what (loaded by)")
    for r in rows:
        same = " = weight-only: the file quantizes no input" if r.get("same_as") else ""
        click.echo(f"    {r['row']:<12} {r['sqnr']:8.2f} {r['psnr']:8.2f} {r['cosine']:9.6f}  {r['what']}{same} "
                   f"({r['loaded_by']})")


def sensitivity(report, show: int) -> None:
    click.echo(f"  {report.architecture}, {report.inputs}; recipe {report.recipe}, {len(report.layers)} layers ranked")
    click.echo("  output SQNR with each layer alone in FP8, worst first:")
    for cost in report.layers[:show]:
        click.echo(f"    {cost.sqnr:8.2f} dB  {printable(cost.name)}  ({cost.kind})")
    click.echo(f"  all {len(report.layers)} in FP8: output SQNR {report.all_sqnr:.2f} dB")
    if report.keep is not None:
        rules = " ".join(f"--keep {shell(name)}" for name in report.keep) or "(none)"
        verdict = "meets" if report.target_met else "does NOT meet"
        click.echo(f"  keep {len(report.keep)} layer(s) for {report.target_sqnr:g} dB: {rules}")
        click.echo(f"  with them kept: output SQNR {report.keep_sqnr:.2f} dB ({verdict} the target)")


# ----------------------------------------------------------------------------- calibrate, stats, publish, verify

def calibration(result, out: str, rss: int | None) -> None:
    for note in result.notes:
        click.echo(f"  note: {note}")
    click.echo(f"  weights: {result.layers} observed ({result.weight_observer}, {result.granularity} scales)")
    if result.activation_observer:
        click.echo(f"  inputs: {result.inputs_observed} layers observed ({result.activation_observer}) over "
                   f"{result.samples} samples: {result.inputs}")
        click.echo(f"  weights held at most: {size(result.peak_bytes)} of {size(result.model_bytes)} (streamed)")
        for name, rng in result.largest_inputs(5):
            click.echo(f"    input range {rng:10.4g}  {printable(name)}")
    click.echo(f"  time: {result.seconds:.2f} s" + (f", process peak RSS {size(rss)}" if rss else ""))
    click.echo(f"  source sha256 {result.source_sha256}")
    click.echo(f"  wrote {out} (sha256 {result.stats_sha256})")


def stats_file(path: str, s, rows: list[dict], top: int, sort: str) -> None:
    """``quantkit stats show``: the file's source and observers, then its layers' ranges."""
    click.echo(f"stats {path}")
    click.echo(f"  source: {s.source.get('name', '?')}  sha256 {s.source_sha256}")
    click.echo(f"  weights: {len(s.weights)} ({s.weight_observer}, {s.granularity.value} scales, {s.fp8.name})")
    click.echo(f"  inputs: {len(s.activations)} layers ({s.activation_observer}, static per tensor) over "
               f"{s.samples} samples: {s.inputs}" if s.activation_observer else "  inputs: none (weights only)")
    if h := s.hessians:
        click.echo(f"  GPTQ Hessians: {len(h['layers'])} layers ({len(h['tokens'])} distinct inputs) in {h['file']}"
                   f" ({(h.get('bytes') or 0) / 1e9:.3g} GB), for convert --rounding gptq")
    shown = rows[:top]
    if shown:
        click.echo(f"  {'input range':>12} {'outlier':>8} {'weight range':>12} {'outlier':>8}  layer "
                   f"(by {'range' if sort == 'range' else 'outlier ratio, inputs'}; {len(shown)} of {len(rows)})")
        for r in shown:
            click.echo(f"  {num(r['input_range']):>12} {num(r['input_outlier'], 1):>8} "
                       f"{num(r['weight_range']):>12} {num(r['weight_outlier'], 1):>8}  {printable(r['tensor'])}"
                       f"{'  (per sample: weight-only)' if r['input_per_sample'] else ''}")


def publication(result, out: str, dst: str) -> None:
    click.echo(f"quantkit publish: {out} -> {dst}")
    for note in result.notes:
        click.echo(f"  note: {note}")
    weights = [f for f in result.files if f["name"].endswith(".safetensors")]
    click.echo(f"  {len(result.files)} files, weights {size(sum(f['bytes'] for f in weights))} "
               f"in {len(weights)} file(s)")
    v = result.validation
    if v and v["summary"].get("sqnr_db"):
        click.echo(f"  validation: {v['summary']['quantized']} FP8 tensors, SQNR min "
                   f"{v['summary']['sqnr_db']['min']:.2f} dB")
    click.echo(f"  SHA256SUMS sha256 {result.sums_sha256}  (publish it beside the link: it pins every file)")


def verification(report, folder: str, against: str | None) -> None:
    click.echo(f"quantkit verify: {folder}" + (f" against {against}" if against else ""))
    click.echo(f"  sha256: {sum(c['ok'] for c in report.checked)} of {len(report.checked)} files match")
    if report.ok:
        click.echo(f"  PASS ({report.seconds:.2f} s)")
    else:
        click.echo(f"  FAIL: {len(report.problems)} problem(s)")
        for p in report.problems:
            click.echo(f"    {p}")
