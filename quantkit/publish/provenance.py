"""What a release records about how its weights were made, derived from the output and its
manifest: the tensor table (how each tensor is stored, and the recorded policy's reason), the
``quantkit convert`` command that rewrites the output, and the validation summary (from a
``quantkit validate --json`` report, checked to be about this output and its source).
"""
from __future__ import annotations

import hashlib
import math
import os
import shlex

from ..errors import UnsupportedInputError, ValidationFailed
from ..jsonfiles import JSONFileError, parse_json, read_side_file
from ..manifest import manifest_path, runtime_versions
from ..progress import Progress
from .release import PROVENANCE_SCHEMA, file_role

MAX_REPORT_BYTES = 1 << 30


def convert_command(conversion: dict, source_name: str, output_name: str) -> str:
    """The ``quantkit convert`` command that rewrites the output, every option spelled out (so a
    later change of a default does not change what it does)."""
    o = conversion.get("options")
    if o is None:        # a manifest written before quantkit recorded its options: the recorded policy's name
        o = {"format": conversion["format"], "granularity": conversion["granularity"], "fp8": conversion["fp8"],
             "keep_dtype": conversion["keep_dtype"], "preset": conversion["policy"]["name"], "rules": []}
    args = ["quantkit", "convert", source_name, output_name, "--format", o["format"], "--granularity",
            o["granularity"], "--fp8-dtype", o["fp8"], "--keep-dtype", o["keep_dtype"], "--preset", o["preset"]]
    if o.get("recipe"):
        args += ["--recipe", o["recipe"]]
    for action, pattern in o.get("rules") or []:
        args += [f"--{action}", pattern]
    for flag in ("quantize_conv", "allow_nonfinite", "comfy_header_metadata", "ema"):
        if o.get(flag):
            args.append("--" + flag.replace("_", "-"))
    if o.get("component"):
        args += ["--component", o["component"]]
    if o.get("max_shard_bytes"):
        args += ["--max-shard-size", _size_arg(o["max_shard_bytes"])]
    stats = conversion.get("stats")
    if stats and stats.get("file"):
        args += ["--stats", stats["file"]]
    if o.get("rounding") and o["rounding"] != "nearest":
        args += ["--rounding", o["rounding"]]
    return shlex.join(args)


def calibration_record(conversion: dict) -> dict:
    """How the scales were calibrated, from the manifest's record of the conversion: absmax of the
    weights alone, or a stats file (``convert --stats``: its name, SHA256 and what it measured)."""
    stats = conversion.get("stats")
    if not stats:
        return {"weights": f"absmax per {conversion['granularity']}, from the weights alone",
                "activations": None, "stats_file": None}
    weights = (f"{stats.get('weight_observer')} ranges per {stats.get('granularity')} from the statistics file "
               f"for {stats.get('weight_scales')} tensor(s), absmax from the weights for any other")
    activations = None
    if stats.get("input_scales"):
        activations = (f"calibrated: static input scales (input_scale = range / FP8 maximum) for "
                       f"{stats['input_scales']} layer(s), {stats.get('activation_observer')} over "
                       f"{stats.get('samples')} forward pass(es) of {stats.get('inputs') or 'unrecorded inputs'}")
    description = {k: v for k, v in stats.items() if k not in ("file", "sha256")}
    return {"weights": weights, "activations": activations,
            "stats_file": {"name": stats.get("file"), "sha256": stats.get("sha256"), "description": description}}


def _size_arg(n: int) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def tensor_table(out: str, conversion: dict) -> list[dict]:
    """Every source tensor of the output: how it is stored, and why: the plan's decision as the
    manifest records it, checked against what the output holds (a manifest written before quantkit
    recorded decisions: the recorded policy's decision, re-derived)."""
    from ..formats import get_format
    from ..readback import open_output
    recorded = {d[0]: tuple(d[1:]) for d in conversion.get("decisions") or []}
    rows = []
    with open_output(out) as f:
        stored = get_format(conversion["format"]).stored(f)
        decide = _recorded(recorded, out) if recorded else _rederived(conversion)
        for name, s in stored.items():
            info = f.tensors[s.data_key]
            fp8 = s.scale_key is not None
            action, kind, reason = decide(name, info, fp8)
            rows.append({"name": name, "shape": list(info.shape), "stored": info.dtype.code,
                         "granularity": s.granularity.value if fp8 else None, "action": action, "kind": kind,
                         "reason": reason})
        missing = recorded.keys() - stored.keys()
    if missing:
        raise UnsupportedInputError(f"the manifest records {len(missing)} tensor(s) the output does not hold "
                                    f"({', '.join(sorted(missing)[:3])})", path=out,
                                    hint="the manifest belongs to another output; re-run quantkit convert")
    return rows


def _recorded(recorded: dict, out: str):
    def decide(name, info, fp8):
        if name not in recorded:
            raise UnsupportedInputError(f"the manifest records no decision for {name}", path=out,
                                        hint="the manifest belongs to another output; re-run quantkit convert")
        action, kind, reason = recorded[name]
        if fp8 != (action == "quantize"):
            raise UnsupportedInputError(f"the manifest says {name} was to {action}, the output stores it "
                                        f"{'in FP8' if fp8 else 'as ' + info.dtype.code}", path=out,
                                        hint="the manifest belongs to another output; re-run quantkit convert")
        return action, kind, reason
    return decide


def _rederived(conversion: dict):
    from .. import dtypes
    policy = recorded_policy(conversion)
    carried = any("already quantized" in n for n in conversion.get("notes") or [])

    def decide(name, info, fp8):
        decision = policy.decide(name, info.shape, dtypes.F32 if fp8 else info.dtype)
        action, reason = decision.action.value, decision.reason
        if fp8 and carried:
            action, reason = "quantize", "already FP8 in the source: codes and scale carried over"
        elif fp8 != (action == "quantize"):
            action = "quantize" if fp8 else "keep"
            reason = f"stored {'FP8' if fp8 else info.dtype.code}; the recorded policy says: {reason}"
        return action, decision.kind.value, reason
    return decide


def recorded_policy(conversion: dict):
    """The policy a conversion applied, rebuilt from the manifest: the preset's rules (labelled as
    the preset's), then the user's."""
    from ..policy import Action, Policy, Rule
    desc = conversion["policy"]
    rules = [tuple(r) for r in desc["rules"]]
    user = [tuple(r) for r in (conversion.get("options") or {}).get("rules") or []]
    preset = len(rules) - (len(user) if user and rules[len(rules) - len(user):] == user else 0)
    defaults = desc.get("defaults", {})
    return Policy(tuple(Rule(Action(a), p, f"preset {desc['name']}" if i < preset else "")
                        for i, (a, p) in enumerate(rules)),
                  quantize_conv=defaults.get("convolution") == "quantize", name=desc["name"],
                  keep_attention="attention" in defaults)


def from_report(path: str, manifest: dict) -> dict:
    try:
        raw = read_side_file(path, MAX_REPORT_BYTES)     # its SHA256 is recorded too
        doc = parse_json(raw, path)
    except OSError as exc:
        raise UnsupportedInputError(f"cannot read the report: {exc.strerror}", path=path,
                                    hint="pass the file quantkit validate --json wrote") from None
    except JSONFileError as exc:
        raise UnsupportedInputError(f"the report is not JSON ({exc})", path=path,
                                    hint="pass the file quantkit validate --json wrote") from None
    if not _well_formed(doc):
        raise UnsupportedInputError("not a quantkit validate --json report", path=path,
                                    hint="pass the file quantkit validate --json wrote")
    seen = {h.get("actual") for h in doc["hashes"] if isinstance(h, dict) and h.get("role") == "output"}
    wanted = {e["sha256"] for e in manifest["files"].values()}
    if not wanted <= seen:
        raise UnsupportedInputError("the report does not record this output's SHA256: it is about another output, "
                                    "or was made with --no-hash-check", path=path,
                                    hint="run quantkit validate on this output (with its manifest) and pass its report")
    recorded = {f.get("sha256") for f in manifest["source"].get("files") or []}
    checked = {h.get("actual") for h in doc["hashes"] if isinstance(h, dict) and h.get("role") == "source"}
    if doc.get("against") and not checked <= recorded:
        raise UnsupportedInputError("the report compared the output with another source (its hash is not the "
                                    "manifest's)", path=path, hint="validate against the checkpoint OUT was made from")
    if doc["ok"] is not True:
        failures = [str(f) for f in doc.get("failures") or []]
        raise ValidationFailed(f"the report records a failed validation ({len(failures)} problem(s): "
                               + "; ".join(failures[:3]) + ")", path=path,
                               hint="fix the output and validate again; nothing was published")
    below = _below_floor(doc, manifest)
    if below:
        raise ValidationFailed(f"the report passed, but {len(below)} FP8 tensor(s) fall below the sanity floor "
                               "validate now applies: " + "; ".join(below[:3]), path=path,
                               hint="validate again with this quantkit (or set your bar with --min-sqnr); "
                                    "nothing was published")
    digest = hashlib.sha256(raw).hexdigest()
    against = os.path.basename(os.path.normpath(doc["against"])) if doc.get("against") else None
    return validation_record(doc, f"Validated with `quantkit validate` (report `{os.path.basename(path)}`, "
                                   f"SHA256 `{digest}`)", against)


def _below_floor(doc: dict, manifest: dict) -> list[str]:
    """The default sanity floor (``quantkit.validation.sqnr_floor``) applied to a report's FP8 tensors,
    for a report that passed without it (written before quantkit had it, or edited), unless the
    report's own bar (--min-sqnr) replaced it. Each tensor's floor comes from its PSNR - SQNR (its
    peak-to-RMS ratio) and the manifest's FP8 dtype."""
    if doc.get("min_sqnr") is not None:
        return []
    from ..dtypes import E4M3FN, FP8_FORMATS
    from ..validation import floor_failure, sqnr_floor
    fmt = FP8_FORMATS.get((manifest.get("conversion") or {}).get("fp8"), E4M3FN)
    failures = []
    for t in doc["tensors"]:
        sqnr, psnr, cosine = t.get("sqnr"), t.get("psnr"), t.get("cosine")
        if t["stored"] == "fp8" and sqnr is not None and psnr is not None:      # None: exact
            floor = sqnr_floor(psnr - sqnr, fmt)
            if sqnr < floor:
                failures.append(floor_failure(t["name"], sqnr, math.nan if cosine is None else cosine, floor))
    return failures


def _well_formed(doc) -> bool:
    """The fields the card prints have the types ``ValidationReport.to_dict`` gives them (the report
    is the user's file: a string where a number belongs must not reach the card's formatting)."""
    def num(v):
        return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))

    def stat(v):
        return v is None or (isinstance(v, dict) and all(num(v.get(k)) for k in ("min", "median")))
    if not isinstance(doc, dict) or not isinstance(doc.get("ok"), bool) or not isinstance(doc.get("hashes"), list):
        return False
    s, tensors, m = doc.get("summary"), doc.get("tensors"), doc.get("model_output")
    return (isinstance(s, dict) and all(num(s.get(k)) for k in ("tensors", "quantized"))
            and all(stat(s.get(k)) for k in ("sqnr_db", "psnr_db", "cosine"))
            and isinstance(tensors, list) and all(
                isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("stored"), str)
                and isinstance(t.get("granularity"), (str, type(None)))
                and all(num(t.get(k)) for k in ("sqnr", "psnr", "cosine", "max_abs_error")) for t in tensors)
            and (m is None or isinstance(m, dict) and all(num(m.get(k)) for k in ("sqnr", "cosine", "rel_l2"))
                 and all(isinstance(m.get(k), str) for k in ("architecture", "inputs")))
            and num(doc.get("min_sqnr")) and isinstance(doc.get("against"), (str, type(None))))


def validation_record(doc: dict, how: str, against: str | None) -> dict:
    s = doc.get("summary") or {}
    keep = ("name", "stored", "granularity", "sqnr", "psnr", "cosine", "max_abs_error", "exact")
    floor = doc.get("sqnr_floor")
    return {"how": how, "against": against, "ok": bool(doc.get("ok")), "min_sqnr": doc.get("min_sqnr"),
            "sqnr_floor": floor if isinstance(floor, dict) and floor.get("rule") == "default" else None,
            "summary": {k: s.get(k) for k in ("tensors", "quantized", "sqnr_db", "psnr_db", "cosine")},
            "model_output": doc.get("model_output"),
            "tensors": [{k: t.get(k) for k in keep} for t in doc.get("tensors") or []
                        if isinstance(t, dict) and t.get("stored") != "bytes"],
            "notes": [str(n) for n in doc.get("notes") or []]}


# ----------------------------------------------------------------------------- publish's record

def validation(out: str, manifest: dict, options, progress: Progress) -> dict | None:
    """The validation summary the card shows: from ``options.report``, or run now against the source
    (``options``: the ``PublishOptions``)."""
    if options.report is not None:
        return from_report(options.report, manifest)
    if options.against is None:
        return None
    from ..validation import validate
    report = validate(out, options.against, check_hash=False, model_output=options.model_output, progress=progress)
    if not report.ok:
        raise ValidationFailed(f"validation failed, {len(report.failures)} problem(s): "
                               + "; ".join(report.failures[:3]), path=out,
                               hint="quantkit validate lists every problem; nothing was published")
    return validation_record(report.to_dict(), "Validated by `quantkit publish` (per tensor"
                              + (", and at the model's output)" if options.model_output else ")"),
                              os.path.basename(os.path.abspath(options.against)))


def record(out: str, dst: str, manifest: dict, options, source, validation: dict | None, folder: str,
           digests: dict[str, str]) -> dict:
    """The release's record: everything the card says, as data (``PROVENANCE_SCHEMA``). ``options``:
    the ``PublishOptions``; ``source``: the ``publish.source.Source``; ``digests``: name -> SHA256 of
    every file placed in ``folder``."""
    from ..dtypes import FP8_FORMATS
    conversion = dict(manifest["conversion"])
    fp8 = FP8_FORMATS.get(conversion.get("fp8"))
    conversion["scale_rule"] = (f"scale = absmax / {fp8.max_finite:g} (the {fp8.name} maximum), per "
                                f"{conversion['granularity']}" if fp8 else "recorded in the weights")
    card, card_path = source.card(out)
    lic_id = options.license or card.get("license")
    lic_from = "--license" if options.license else ("the source's model card" if card.get("license") else
                                                     "the source's license file")
    files = [{"name": n, "sha256": digests[n], "bytes": os.path.getsize(os.path.join(folder, *n.split("/"))),
              "role": file_role(n)} for n in sorted(digests)]
    found = None if options.base_model else source.base_model(out)
    base = list(options.base_model) or ([found[0]] if found and found[2] else [])
    with open(manifest_path(out), "rb") as f:
        manifest_sha = hashlib.sha256(f.read()).hexdigest()
    return {
        "schema": PROVENANCE_SCHEMA,
        "name": options.name or os.path.basename(os.path.abspath(dst)),
        "base_model": base,
        "base_model_from": ("--base-model" if options.base_model else found[1]) if base else None,
        "base_model_candidate": {"id": found[0], "from": found[1]} if found and not found[2] else None,
        "license": {"id": lic_id, "name": card.get("license_name"), "link": card.get("license_link"),
                    "from": lic_from, "files": [f["name"] for f in files if f["role"] == "license"]},
        "source_card": {k: card[k] for k in ("library_name", "pipeline_tag", "language") if k in card} or None,
        "format": conversion["format"],
        "files": files,
        "output": {"name": os.path.basename(os.path.abspath(out)), "created": manifest.get("created"),
                   "manifest": {"name": os.path.basename(manifest_path(out)), "sha256": manifest_sha},
                   "bytes": sum(f["bytes"] for f in files if f["role"] == "weights")},
        "source": {**source.record, "checked": source.against is not None,
                   "card": os.path.basename(card_path) if card_path else None},
        "conversion": conversion,
        "calibration": calibration_record(conversion),
        "command": {"convert": convert_command(conversion, source.record.get("name") or "SOURCE",
                                               os.path.basename(os.path.abspath(out))),
                    "publish": options.command},
        "versions": {"converted_with": manifest.get("versions") or {"quantkit": manifest.get("quantkit_version")},
                     "published_with": runtime_versions()},
        "validation": validation,
        "tensors": tensor_table(out, conversion),
        "warnings": [],
    }
