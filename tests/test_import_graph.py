"""The import graph of quantkit/ and calibration/ is a tree of stages: no module imports a higher
stage, and no modules import each other (function-level imports and the formats package's
auto-import included).

STAGES is the declared order, lowest first; a module may import its own stage or lower ones.
A module missing from STAGES fails the test: every new module takes a place in the order.
"""
import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STAGES = [
    ("core", ["quantkit._version", "quantkit.errors", "quantkit.dtypes", "quantkit.progress", "quantkit.hashing",
              "quantkit.workers", "quantkit.quiet", "quantkit.jsonfiles"]),
    ("math", ["quantkit.fp8", "quantkit.metrics", "quantkit.gptq"]),
    ("testing kit (independent of the math it checks)", ["quantkit.testing", "quantkit.testing.reference",
                                                          "quantkit.testing.conventions", "quantkit.testing.rules",
                                                          "quantkit.testing.battery", "quantkit.testing.check",
                                                          "quantkit.testing.strategies"]),
    ("read and write", ["quantkit.reader", "quantkit.writer", "quantkit.manifest", "quantkit.torch_pickle",
                        "quantkit.shards", "quantkit.destinations"]),
    ("sources", ["quantkit.checkpoint", "quantkit.comfy_names", "quantkit.comfy_names_video", "quantkit.comfy_names_image",
                 "quantkit.comfy_encoder_names", "quantkit.sources"]),
    ("calibrate, policy and presets", ["quantkit.calibration", "quantkit.calibration.weights",
                                       "quantkit.calibration.observers", "quantkit.calibration.stats",
                                       "quantkit.calibration.hessians",
                                       "quantkit.policy",
                                       "quantkit.presets", "quantkit.presets.base", "quantkit.presets.diffusion",
                                       "quantkit.presets.video", "quantkit.presets.image",
                                       "quantkit.presets.audio_3d", "quantkit.presets.dit_more", "quantkit.presets.cascade", "quantkit.presets.family_encoders",
                                       "quantkit.presets.encoders"]),
    ("options and the plan as data", ["quantkit.options", "quantkit.planned"]),
    ("formats", ["quantkit.formats", "quantkit.formats.base", "quantkit.formats.native", "quantkit.formats.comfy",
                 "quantkit.formats.comfy_legacy", "quantkit.formats.compressed_tensors"]),
    ("plan", ["quantkit.plan"]),
    ("quantize", ["quantkit.quantize"]),
    ("runtime", ["quantkit.runtime.placements", "quantkit.runtime.weights", "quantkit.runtime.budget",
                 "quantkit.runtime.streaming", "quantkit.runtime.loader", "quantkit.runtime.pool", "quantkit.runtime"]),
    ("read-back", ["quantkit.readback"]),
    ("models: built and run from their config", ["quantkit.diffusion_inputs", "quantkit.models"]),
    ("model output", ["quantkit.model_output"]),
    ("calibrate activations", ["quantkit.calibration.inputs", "quantkit.calibration.activations",
                               "quantkit.calibration.collect"]),
    ("held-out evaluation", ["quantkit.heldout"]),
    ("sensitivity", ["quantkit.sensitivity"]),
    ("validate", ["quantkit.validation"]),
    ("reports", ["quantkit.report"]),
    ("publish", ["quantkit.publish.release", "quantkit.publish.card", "quantkit.publish.output",
                 "quantkit.publish.source", "quantkit.publish.verify", "quantkit.publish.provenance",
                 "quantkit.publish.build", "quantkit.publish"]),
    ("command line: how a command ends, its options, what it prints", ["quantkit.cli.group", "quantkit.cli.options",
                                                                       "quantkit.cli.render"]),
    ("command line: the commands by stage", ["quantkit.cli.convert", "quantkit.cli.check", "quantkit.cli.calibrate",
                                             "quantkit.cli.release"]),
    ("command line and public API", ["quantkit.cli", "quantkit.cli.__main__", "quantkit"]),
]
FLOOR = {module: i for i, (_, modules) in enumerate(STAGES) for module in modules}


def modules() -> dict[str, str]:
    """Module name -> file, for quantkit/ and calibration/ (installed as quantkit.calibration)."""
    found = {}
    for folder, package in (("quantkit", "quantkit"), ("calibration", "quantkit.calibration")):
        for d, _, files in os.walk(os.path.join(ROOT, folder)):
            for f in files:
                if not f.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(d, f), os.path.join(ROOT, folder))[:-3].replace(os.sep, ".")
                name = package if rel == "__init__" else f"{package}.{rel.removesuffix('.__init__')}"
                found[name] = os.path.join(d, f)
    return found


def imports(name: str, path: str, known: set[str]) -> set[str]:
    """The quantkit modules ``name`` imports anywhere in its file (module level or in functions)."""
    is_package = path.endswith("__init__.py")
    package = name if is_package else name.rpartition(".")[0]
    tree = ast.parse(open(path, encoding="utf-8").read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:          # quantkit.fp8.absmax -> quantkit.fp8
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    source = open(path, encoding="utf-8").read()
    if is_package and re.search(r"pkgutil\.iter_modules", source):     # an auto-import of every child
        out |= {m for m in known if m.rpartition(".")[0] == name}
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def test_every_module_has_a_stage(graph):
    missing = sorted(set(graph) - set(FLOOR))
    assert not missing, f"declare the stage of {missing} in STAGES"


def test_no_module_imports_a_higher_stage(graph):
    upward = [f"{a} ({STAGES[FLOOR[a]][0]}) imports {b} ({STAGES[FLOOR[b]][0]})"
              for a, targets in sorted(graph.items()) for b in sorted(targets) if FLOOR[b] > FLOOR[a]]
    assert not upward, "\n".join(upward)


def test_no_circle(graph):
    """Tarjan's strongly connected components: any of two or more modules is a circle."""
    index, low, stack, on, circles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not circles, circles


def test_the_seams_issue_15_named(graph):
    assert "quantkit.comfy_names" not in graph["quantkit.checkpoint"]
    assert not [m for m, t in graph.items() if m.startswith("quantkit.formats") and "quantkit.plan" in t]
    assert "quantkit.validation" not in graph["quantkit.model_output"]


def test_the_parser_sees_function_level_imports(graph):
    """A check that cannot fail proves nothing: the parser finds validate's deferred import."""
    assert "quantkit.model_output" in graph["quantkit.validation"]
    assert "quantkit.formats.native" in graph["quantkit.formats"]       # the auto-import
