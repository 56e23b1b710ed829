"""The model card (README.md) of a release, rendered from its provenance record alone.

YAML front matter in the model hub's conventions, then what a downloader asks: what was quantized
and what kept (with reasons), the recipe, the validation figures, how to load it, how to reproduce
it, where it came from, and every file's SHA256 (``quantkit verify`` checks those lines against
SHA256SUMS). Rendering is a pure function of the record: the same record gives the same bytes.

The front matter is written by hand (no YAML library is a dependency): keys are fixed, every value
is a YAML double-quoted scalar (``yaml_string``).
"""
from __future__ import annotations

import json
import re
from collections import Counter

from ..formats import REGISTRY, OutputFormat
from .release import PROVENANCE_NAME, SUMS_NAME

FILES_HEADING = "## Files"
EXAMPLES = 3
_FILE_ROW = re.compile(r"\|\s*`([^`]+)`\s*\|[^|]*\|\s*`([^`]*)`\s*\|\s*")


# ----------------------------------------------------------------------------- reading cards

def read_front_matter(text: str) -> dict[str, str]:
    """The top-level scalar fields of a card's YAML front matter (``license: apache-2.0``): enough
    to carry a source's license, library and task. Lists and nested values are left out."""
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    fields = {}
    for line in lines[1:]:
        if line.strip() == "---":
            return fields
        m = re.fullmatch(r"([A-Za-z_][\w-]*):[ \t]*(\S.*?)\s*", line)
        if m and not m.group(2).startswith(("[", "{", "|", ">", "&", "*", "#")):
            # a "\ud800" escape would leave a lone surrogate, which no UTF-8 card can hold
            fields[m.group(1)] = _scalar(m.group(2)).encode("utf-8", "replace").decode("utf-8")
    return {}          # no closing '---': not front matter


def _scalar(raw: str) -> str:
    if raw[0] == '"' and raw.endswith('"') and len(raw) > 1:
        try:
            return json.loads(raw)
        except ValueError:
            return raw[1:-1]
    if raw[0] == "'" and raw.endswith("'") and len(raw) > 1:
        return raw[1:-1].replace("''", "'")
    return re.sub(r"\s+#.*$", "", raw)


def listed_hashes(card: str) -> dict[str, str]:
    """The card's Files table: file name -> the SHA256 it shows (what verify compares with SHA256SUMS)."""
    out = {}
    section = card.split(FILES_HEADING + "\n", 1)
    if len(section) < 2:
        return out
    for line in section[1].splitlines():
        if line.startswith("## "):
            break
        m = _FILE_ROW.fullmatch(line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


# ----------------------------------------------------------------------------- front matter

def front_matter(prov: dict) -> dict:
    """The hub metadata: base model and relation, library, license, task, tags (in this order)."""
    fmt = _format(prov)
    lic = prov.get("license") or {}
    source_card = prov.get("source_card") or {}
    fields: dict = {}
    if prov["base_model"]:
        fields["base_model"] = prov["base_model"][0] if len(prov["base_model"]) == 1 else list(prov["base_model"])
        fields["base_model_relation"] = "quantized"
    library = fmt.card_library(source_card)
    if library:
        fields["library_name"] = library
    if lic.get("id"):
        fields["license"] = lic["id"]
        for key in ("name", "link"):
            if lic.get(key):
                fields[f"license_{key}"] = lic[key]
    task = fmt.card_pipeline_tag(source_card)
    if task:
        fields["pipeline_tag"] = task
    fields["tags"] = list(dict.fromkeys([*fmt.card_tags, "fp8", prov["conversion"]["fp8"], "quantized",
                                         "quantkit"]))
    return fields


def yaml_front_matter(fields: dict) -> str:
    """``---`` / ``key: "value"`` lines (lists as ``- "item"``) / ``---``."""
    out = ["---"]
    for key, value in fields.items():
        if isinstance(value, list):
            out.append(f"{key}:")
            out.extend(f"- {yaml_string(v)}" for v in value)
        else:
            out.append(f"{key}: {yaml_string(value)}")
    return "\n".join(out + ["---", ""])


def yaml_string(text: str) -> str:
    """A YAML double-quoted scalar of ``text``: printable characters as they are, every other one
    escaped (YAML refuses non-printable characters even inside quotes, and its ``\\u`` escapes do
    not pair surrogates as JSON's do, so ``json.dumps`` is not one)."""
    out = []
    for ch in text:
        c = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif 0x20 <= c <= 0x7E or 0xA0 <= c <= 0xD7FF or 0xE000 <= c <= 0xFFFD and c != 0xFEFF or c >= 0x10000:
            out.append(ch)
        else:
            out.append(f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}")
    return '"' + "".join(out) + '"'



# ----------------------------------------------------------------------------- body

def render(prov: dict) -> str:
    """README.md of the release described by ``prov`` (a provenance record, see ``quantkit.publish.provenance.record``)."""
    parts = [yaml_front_matter(front_matter(prov)), _overview(prov), _files(prov), _plan(prov), _recipe(prov),
             _validation(prov), _loading(prov), _reproduce(prov), _source(prov), _license(prov)]
    return "\n".join(p.rstrip("\n") + "\n" for p in parts)


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n} bytes"


def _md(text: str) -> str:
    """Text for a table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _overview(prov: dict) -> str:
    c = prov["conversion"]
    counts = c["counts"]
    base = prov["base_model"]
    of = f" of [{base[0]}](https://huggingface.co/{base[0]})" if base else f" of `{prov['source']['name']}`"
    src, out = prov["source"].get("bytes"), prov["output"]["bytes"]
    ratio = f" ({100 * out / src:.0f}% of the source's {_size(src)})" if src else ""
    return (f"# {prov['name']}\n\n"
            f"FP8 ({c['fp8']}) weights{of}, made with quantkit {prov['versions']['converted_with']['quantkit']}: "
            f"{counts.get('quantize', 0)} tensors quantized with {c['granularity']} scales, "
            f"{counts.get('keep', 0)} kept in {c['keep_dtype'].upper()}, {counts.get('pass', 0)} passed through "
            f"untouched; format `{prov['format']}`, {_size(out)}{ratio}.\n")


def _files(prov: dict) -> str:
    rows = "".join(f"| `{f['name']}` | {f['bytes']:,} | `{f['sha256']}` |\n" for f in prov["files"])
    return (f"{FILES_HEADING}\n\n| file | bytes | SHA256 |\n| --- | ---: | --- |\n{rows}\n"
            f"`{SUMS_NAME}` lists every file of this folder (this card and `{PROVENANCE_NAME}` too): check a "
            f"download with `sha256sum -c {SUMS_NAME}`, or with `quantkit verify .`, which also parses every "
            f"weight file against its declared format and `{PROVENANCE_NAME}` (`--against SOURCE` checks the "
            "source's hashes too).\n")


def _stored(t: dict) -> str:
    return f"FP8 ({t['granularity']} scales)" if t["action"] == "quantize" else (
        f"{t['stored']} (kept)" if t["action"] == "keep" else f"{t['stored']} (untouched)")


def _plan(prov: dict) -> str:
    tensors = prov["tensors"]
    groups = Counter((_stored(t), t["reason"]) for t in tensors)
    examples: dict = {}
    rank = {}            # quantized first, then kept, then untouched
    for t in tensors:
        examples.setdefault((_stored(t), t["reason"]), []).append(t["name"])
        rank[_stored(t)] = ("quantize", "keep", "pass").index(t["action"])
    rows = []
    for (stored, reason), n in sorted(groups.items(), key=lambda e: (rank[e[0][0]], e[0][0], -e[1], e[0][1])):
        names = examples[(stored, reason)]
        shown = ", ".join(f"`{x}`" for x in names[:EXAMPLES]) + (", ..." if len(names) > EXAMPLES else "")
        rows.append(f"| {stored} | {n} | {_md(reason)} | {shown} |")
    detail = "".join(f"| `{t['name']}` | {'x'.join(map(str, t['shape'])) or 'scalar'} | {_stored(t)} | "
                     f"{_md(t['reason'])} |\n" for t in tensors)
    return ("## What was quantized, what was kept, and why\n\n"
            "| stored as | tensors | reason | examples |\n| --- | ---: | --- | --- |\n" + "\n".join(rows) + "\n\n"
            f"<details><summary>Every tensor ({len(tensors)})</summary>\n\n"
            "| tensor | shape | stored as | reason |\n| --- | --- | --- | --- |\n" + detail + "\n</details>\n")


def _recipe(prov: dict) -> str:
    c = prov["conversion"]
    o = c.get("options") or {}
    rules = c["policy"]["rules"]
    lines = [f"- format: `{prov['format']}`",
             f"- FP8 dtype: `{c['fp8']}`; scales: {c['granularity']} (`W = q * scale`, {c['scale_rule']})",
             f"- kept tensors: {c['keep_dtype']}",
             f"- preset: `{c['policy']['name']}`" + (f" (asked: `{o['preset']}`)" if o.get("preset") else "")
             + (f"; recipe `{c['recipe']}`" if c.get("recipe") else ""),
             f"- calibration: {prov['calibration']['weights']}; activations: "
             f"{prov['calibration']['activations'] or 'none (weight-only FP8, no input scales)'}; "
             f"statistics file: {_stats_file(prov['calibration']['stats_file'])}"]
    for note in c.get("notes") or []:
        lines.append(f"- {note}")
    table = "".join(f"| {i} | {a} | `{_md(p)}` |\n" for i, (a, p) in enumerate(rules, 1))
    return ("## Recipe\n\n" + "\n".join(lines) + "\n\n"
            "Policy rules, in order (the last rule that matches a tensor wins; linear layers are quantized and "
            "everything else kept unless a rule says otherwise):\n\n"
            "| # | action | pattern |\n| --- | --- | --- |\n" + (table or "| - | - | (none) |\n"))


def _stats_file(stats: dict | None) -> str:
    if not stats:
        return "none"
    return f"`{_md(str(stats.get('name')))}` (SHA256 `{stats.get('sha256')}`)"


def _fmt(v, spec: str = ".2f") -> str:
    return "exact" if v is None else format(v, spec)


def _validation(prov: dict) -> str:
    v = prov.get("validation")
    if not v:
        return ("## Validation\n\n**Not validated.** No validation was run for this release: its tensors were not "
                "compared with the source. Run `quantkit validate OUT --against SOURCE` and publish with "
                "`--report`, or publish with `--against SOURCE`.\n")
    s = v["summary"]
    bar = f" (bar: SQNR >= {v['min_sqnr']:g} dB for every tensor)" if v.get("min_sqnr") is not None else ""
    floor = v.get("sqnr_floor")
    if not bar and s.get("quantized") and isinstance(floor, dict) and isinstance(floor.get("margin_db"), (int, float)):
        bar = (f" (sanity floor: every FP8 tensor's SQNR within {floor['margin_db']:g} dB of the least that "
               "round-to-nearest with its own absmax scale gives its data)")
    against = f"against `{v['against']}`" if v.get("against") else "without the source (integrity only)"
    out = [f"## Validation\n\n{v['how']}, {against}: {'passed' if v['ok'] else 'FAILED'}{bar}."]
    if s.get("sqnr_db"):
        out.append(f"{s['tensors']} tensors compared, {s['quantized']} of them FP8. FP8 tensors: SQNR min "
                   f"{_fmt(s['sqnr_db']['min'])} dB, median {_fmt(s['sqnr_db']['median'])} dB; PSNR min "
                   f"{_fmt(s['psnr_db']['min'])} dB; cosine min {_fmt(s['cosine']['min'], '.6f')}.")
    elif s.get("tensors") == 0:
        out.append("Integrity only: the report compared no tensor with the source.")
    m = v.get("model_output")
    if m:
        out.append(f"\nAt the model's output ({m['architecture']}, {m['inputs']}): SQNR {_fmt(m['sqnr'])} dB, "
                   f"cosine {_fmt(m['cosine'], '.6f')}, relative L2 error {_fmt(m['rel_l2'], '.4f')}.")
        w8a8 = [r for r in m.get("rows") or [] if r.get("row") != "weight-only" and not r.get("same_as")]
        if w8a8:
            # FP8 activations as FP8 matmul runs them, simulated on CPU: what a GPU user gets beside weight-only.
            out.append("\n| model output | SQNR dB | cosine | how |\n| --- | ---: | ---: | --- |\n" + "".join(
                f"| {r['row']} | {_fmt(r['sqnr'])} | {_fmt(r['cosine'], '.6f')} | {r['what']} |\n"
                for r in m["rows"] if not r.get("same_as")))
    rows = "".join(f"| `{t['name']}` | {t['stored']} | {t['granularity'] or '-'} | {_fmt(t['sqnr'])} | "
                   f"{_fmt(t['psnr'])} | {_fmt(t['cosine'], '.6f')} | {_fmt(t['max_abs_error'], '.3g')} |\n"
                   for t in v["tensors"])
    if rows:
        out.append(f"\n<details><summary>Per tensor ({len(v['tensors'])})</summary>\n\n"
                   "| tensor | stored | granularity | SQNR dB | PSNR dB | cosine | max abs error |\n"
                   "| --- | --- | --- | ---: | ---: | ---: | ---: |\n" + rows + "\n</details>")
    return " ".join(out[:2]) + "\n" + "\n".join(out[2:]) + "\n"


def _format(prov: dict) -> OutputFormat:
    """The format object the record names (its card hooks); the generic text for a name no format has."""
    return REGISTRY.get(prov["format"], OutputFormat)()


def _loading(prov: dict) -> str:
    fmt = _format(prov)
    weights = [f["name"] for f in prov["files"] if f["role"] in ("weights", "index")]
    target = weights[0] if len(weights) == 1 else "."
    version = prov["versions"]["converted_with"]["quantkit"]
    imports, model, path = fmt.runtime_snippet(target)
    runtime = ("\nWith the quantkit runtime (any format: FP8 weights stay FP8 in memory and are dequantized as each "
               "layer runs; `mode=\"streamed\"` holds two blocks at a time):\n\n```python\n"
               + imports
               + f"import quantkit.runtime as qr   # pip install quantkit=={version}\n\n"
               f"with qr.empty_weights():\n    model = {model}\n"
               f"qr.load(model, \"{path}\").eval()   "
               "# from_config builds it in training mode (dropout on)\n```\n")
    return "## How to load\n\n" + fmt.how_to_load(target, prov) + runtime + "\n"


def _reproduce(prov: dict) -> str:
    v = prov["versions"]["converted_with"]
    pins = " ".join(f"{k}=={v[k]}" for k in ("quantkit", "torch", "safetensors", "numpy") if v.get(k))
    python = f" (Python {v['python']})" if v.get("python") else ""
    return ("## Reproduce\n\n"
            f"From the source below (check its SHA256 first), with {pins}{python}:\n\n"
            f"```bash\n{prov['command']['convert']}\n```\n\n"
            "The same source, options and versions give byte-identical weight files: compare their SHA256 with "
            "the Files table above.\n")


def _source(prov: dict) -> str:
    s = prov["source"]
    rows = "".join(f"| `{f['name']}` | {f['bytes']:,} | `{f['sha256']}` |\n" for f in s.get("files") or [])
    checked = ("checked by `quantkit publish --against`" if s.get("checked")
               else "as recorded at conversion (not re-checked at publishing)")
    extra = [f"layout {s['layout']}"] if s.get("layout") else []
    extra += [f"component `{s['component']}`"] if s.get("component") else []
    extra += ["EMA weights"] if s.get("ema") else []
    extra += [f"read under {s['names']} names"] if s.get("names") else []
    return (f"## Source\n\n`{s['name']}`{' (' + ', '.join(extra) + ')' if extra else ''}, SHA256 {checked}:\n\n"
            f"| file | bytes | SHA256 |\n| --- | ---: | --- |\n{rows}\n"
            f"Everything on this card comes from `{PROVENANCE_NAME}` (also: the exact options, the versions, "
            "the validation report's summary).\n")


def _license(prov: dict) -> str:
    lic = prov.get("license") or {}
    if not lic.get("id") and not lic.get("files"):
        return ("## License\n\nNo license was found with the source. Check the original model's license before "
                "using or redistributing these weights.\n")
    what = f"`{lic['id']}`" if lic.get("id") else "see the license file"
    files = ", ".join(f"`{f}`" for f in lic.get("files") or [])
    return (f"## License\n\n{what}, as the original model's ({lic['from']})" + (f"; {files} included" if files else "")
            + ". These are quantized weights of that model: its license applies.\n")
