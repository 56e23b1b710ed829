"""quantkit.runtime's Pool eviction, ``--max-memory`` for sensitivity, and the pinned-memory path.

What is proved, on tiny real FLUX.1 (diffusers) models converted to FP8 and on the cache alone:
- pure LRU thrashes when two models that do not fit together run in turn (or one model larger than
  the pool runs again): every unit is re-read on every call; the default ``stable`` eviction keeps
  the set of units that fit the same from call to call, so each call re-reads only the rest, and
  the pool's bytes stay within its budget with outputs equal to each model run alone;
- ``sensitivity`` of a model whose float32 copy exceeds its memory share runs within the budget
  (``max_memory``: streamed through the budget runtime) instead of being refused, to the same
  ranking as the resident run; the CLI's ``--max-memory`` reaches it;
- pinned host memory: the path exists, and on a CPU-only build (or a CPU device) it is skipped
  with the reason stated in ``module.quantkit_runtime``.
"""
import pytest
import torch
from tiny_models import FLUX_CONFIG, build, forward, without_zero_layers

import quantkit.runtime as qr
from quantkit.plan import ConvertOptions, Recipe
from quantkit.quantize import convert
from quantkit.runtime.budget import Eviction, UnitCache
from quantkit.runtime.loader import tensor_bytes
from quantkit.runtime.streaming import Streamer


def _convert(root, seed):
    model = without_zero_layers(build("flux", seed))
    model.save_pretrained(root / f"src-{seed}")
    out = root / f"flux-{seed}.safetensors"
    convert(str(root / f"src-{seed}"), str(out), ConvertOptions(recipe=Recipe.COMPACT))
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool")
    return {"a": _convert(root, 0), "b": _convert(root, 7)}


def _empty():
    import diffusers
    with qr.empty_weights():
        return diffusers.FluxTransformer2DModel.from_config(dict(FLUX_CONFIG)).eval()


def _calls(cache: UnitCache, order: list[tuple[str, int]], units: int) -> list[int]:
    """Units read per call when models run in ``order`` ((model, calls)), each unit 1 byte."""
    reads = []
    for owner, calls in order:
        for _ in range(calls):
            cache.begin(owner)
            n = 0
            for u in range(units):
                key = (owner, u)
                if not cache.touch(key):
                    n += 1
                    cache.count(1)
                    if not cache.admit(key, 1, lambda: None):
                        cache.count(-1)
            reads.append(n)
    return reads


def test_lru_thrashes_where_stable_keeps_what_fits():
    alternating = [("a", 1), ("b", 1)] * 3
    lru, stable = UnitCache(15, Eviction.LRU), UnitCache(15, Eviction.STABLE)
    # two models of 10 units, room for 15: LRU re-reads all 10 every call
    assert _calls(lru, alternating, 10) == [10] * 6
    # stable: b's first call takes a's room (a was idle), then the 15 kept stay: 5 re-read per pair
    assert _calls(stable, alternating, 10) == [10, 10, 5, 0, 5, 0]
    assert stable.cached <= stable.capacity and lru.cached <= lru.capacity
    # one model of 10 units in a pool with room for 8, run 3 times: LRU reads everything each time
    assert _calls(UnitCache(8, Eviction.LRU), [("a", 3)], 10) == [10, 10, 10]
    assert _calls(UnitCache(8, Eviction.STABLE), [("a", 3)], 10) == [10, 2, 2]


def test_stable_takes_room_from_the_model_not_in_use():
    cache = UnitCache(10)
    assert _calls(cache, [("a", 1)], 10) == [10]
    assert _calls(cache, [("b", 2)], 6) == [6, 0]          # a's least recently used units made the room
    assert [k for k in cache.evicted] == [("a", u) for u in range(6)]
    assert sum(1 for owner, _ in cache.entries if owner == "a") == 4
    # b's first call takes idle a's room; then a, with b used since a's last call, cannot take b's
    cache = UnitCache(10)
    assert _calls(cache, [("a", 1), ("b", 1), ("a", 1), ("b", 1)], 10) == [10, 10, 10, 0]
    assert all(owner == "b" for owner, _ in cache.entries)
    # b left unused: a's second call in a row takes b's room
    assert _calls(cache, [("a", 3)], 10) == [10, 10, 0] and all(owner == "a" for owner, _ in cache.entries)


def _reads(monkeypatch):
    seen = []
    original = Streamer.read

    def counted(self, unit):
        seen.append((self.owner, unit))
        return original(self, unit)
    monkeypatch.setattr(Streamer, "read", counted)
    return seen


@pytest.mark.parametrize("eviction", ["stable", "lru"])
def test_two_models_in_turn_in_a_pool(files, monkeypatch, eviction):
    alone = {k: forward("flux", qr.load(_empty(), files[k])) for k in files}
    probe = qr.Pool(max_memory=10**12)
    m = probe.load(_empty(), files["a"], prefetch=False)
    units, fixed, reserve = dict(m.quantkit_runtime._streamer.bytes), probe.cache.fixed, probe.cache.reserve
    probe.remove(m)
    size = sum(units.values())
    # room for one model's units and half the other's, beside both models' fixed bytes and the reserve
    budget = 2 * fixed + reserve + size + size // 2
    pool = qr.Pool(max_memory=budget, eviction=eviction)
    a = pool.load(_empty(), files["a"], prefetch=False)
    b = pool.load(_empty(), files["b"], prefetch=False)
    reads = _reads(monkeypatch)
    per_call = []
    for name, model in [("a", a), ("b", b)] * 3:
        before = len(reads)
        assert torch.equal(forward("flux", model), alone[name])
        per_call.append(sum(units[u] for _, u in reads[before:]))
        assert pool.held_bytes == tensor_bytes(a) + tensor_bytes(b)
    assert pool.peak_bytes <= pool.max_memory
    if eviction == "lru":
        assert per_call == [size] * 6                          # every unit re-read every call
    else:
        assert per_call[:2] == [size, size] and max(per_call[2:]) < size   # the kept set holds
        # the pair re-reads what the room (size + size // 2) does not hold, give or take a unit per call
        assert max(per_call[2:]) <= size - size // 2 + max(units.values())
    assert pool.summary()["eviction"] == eviction
    assert eviction in a.quantkit_runtime.residency


def test_the_models_of_a_pool_make_their_weights_in_one_shared_buffer(files):
    """The pool reserves one model's dequantization work at a time: its models share one buffer
    (a model not in use holds none of its own); a model loaded alone has its own."""
    pool = qr.Pool(max_memory=10**12)
    a = pool.load(_empty(), files["a"], compute_dtype=torch.bfloat16)
    b = pool.load(_empty(), files["b"], compute_dtype=torch.bfloat16)
    alone = qr.load(_empty(), files["a"], compute_dtype=torch.bfloat16)
    slot = pool.slot
    assert a.quantkit_runtime.log.slot is slot and b.quantkit_runtime.log.slot is slot
    assert alone.quantkit_runtime.log.slot is not slot
    inputs = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
              for k, v in __import__("tiny_models").example_inputs("flux").items()}
    for model in (a, b, a):
        forward("flux", model, inputs)
    assert slot._buf is not None and alone.quantkit_runtime.log.slot._buf is None


def test_a_pool_names_its_evictions():
    with pytest.raises(ValueError, match="eviction 'mru': use one of stable, lru"):
        qr.Pool(max_memory="1GB", eviction="mru")


@pytest.fixture(scope="module")
def flux_bf16(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sens") / "flux"
    without_zero_layers(build("flux", 3)).to(torch.bfloat16).save_pretrained(folder)
    return folder


def test_sensitivity_runs_within_a_budget_to_the_resident_ranking(flux_bf16, monkeypatch):
    import quantkit.sensitivity as s
    from quantkit.errors import UnsupportedInputError
    options = ConvertOptions(recipe=Recipe.COMPACT)
    resident = s.sensitivity(str(flux_bf16), options, target_sqnr=60)
    p = qr.load(_empty(), flux_bf16 / "diffusion_pytorch_model.safetensors", mode="budget", max_memory=10**12,
                compute_dtype=torch.float32).quantkit_runtime.plan
    smallest = p.fixed + p.work + sum(sorted(p.units.values(), reverse=True)[:2])
    monkeypatch.setattr(s, "MEMORY_FRACTION", 1e-9)          # the model "exceeds" this machine's memory share
    with pytest.raises(UnsupportedInputError, match="holds the model in float32") as refused:
        s.sensitivity(str(flux_bf16), options)
    assert "--max-memory" in refused.value.hint
    reads = _reads(monkeypatch)
    budgeted = s.sensitivity(str(flux_bf16), options, target_sqnr=60, max_memory=smallest)
    assert {unit for _, unit in reads} >= {"transformer_blocks.0", "single_transformer_blocks.1"}   # it streamed
    ranking = [(c.name, c.sqnr, c.cosine) for c in resident.layers]
    assert [(c.name, c.sqnr, c.cosine) for c in budgeted.layers] == ranking        # the same values, bit for bit
    assert len(resident.layers) > 8 and resident.layers[0].sqnr < resident.layers[-1].sqnr
    assert (budgeted.all_sqnr, budgeted.keep, budgeted.keep_sqnr) == (resident.all_sqnr, resident.keep,
                                                                     resident.keep_sqnr)


def test_sensitivity_max_memory_on_the_command_line(flux_bf16, tmp_path, monkeypatch):
    import json

    from runs import run
    import quantkit.sensitivity as s
    monkeypatch.setattr(s, "MEMORY_FRACTION", 1e-9)
    refused = run("sensitivity", flux_bf16, "-q")
    assert refused.exit_code == 2 and "--max-memory" in refused.output
    small = run("sensitivity", flux_bf16, "-q", "--max-memory", "1kB")
    assert small.exit_code == 2 and "cannot hold the largest block in flight" in small.output
    nonsense = run("sensitivity", flux_bf16, "--max-memory", "lots")       # parsed as validate and calibrate do
    assert nonsense.exit_code == 2 and "not a size" in nonsense.output
    report = tmp_path / "s.json"
    ok = run("sensitivity", flux_bf16, "-q", "--max-memory", "1GB", "--json", report)
    assert ok.exit_code == 0, ok.output
    assert len(json.loads(report.read_text())["layers"]) > 0


def test_pinned_host_memory_is_skipped_on_the_cpu_with_the_reason(files):
    model = qr.load(_empty(), files["a"], mode="streamed", host_memory="1GB")
    info = model.quantkit_runtime
    assert info.pinned.startswith("skipped: the model runs on the CPU") and info.pinned_bytes == 0
    assert info._streamer.pinned == {} and info.summary()["pinned"] == info.pinned
    assert qr.load(_empty(), files["a"], mode="streamed").quantkit_runtime.pinned.startswith("off")
    assert qr.load(_empty(), files["a"], host_memory="1GB").quantkit_runtime.pinned.startswith("nothing streamed")
    from quantkit.runtime.streaming import pin_skipped
    if not torch.cuda.is_available():
        assert "has no CUDA runtime" in pin_skipped(torch.device("cuda"))


def test_the_pinned_path_reads_each_pinned_unit_once(files, monkeypatch):
    """Where pinning runs (a CUDA device), simulated on the CPU: pinned units are read once, at load,
    and every call copies them from host memory; the output is resident mode's."""
    import quantkit.runtime.loader as loader
    expected = forward("flux", qr.load(_empty(), files["a"]))
    monkeypatch.setattr(loader, "pin_skipped", lambda device: None)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self.clone())   # CPU-only torch cannot pin
    kept = qr.load(_empty(), files["a"], mode="streamed")       # held: its streamer closes with it
    probe = kept.quantkit_runtime._streamer
    first_two = probe.bytes[probe.order[0]] + probe.bytes[probe.order[1]]
    read = []
    original = loader.read_data
    monkeypatch.setattr(loader, "read_data", lambda source, p, *a: read.append(p.target) or original(source, p, *a))
    model = qr.load(_empty(), files["a"], mode="streamed", host_memory=first_two)
    info = model.quantkit_runtime
    assert list(info._streamer.pinned) == probe.order[:2] and info.pinned_bytes == first_two
    assert info.pinned.startswith(f"2 of {len(probe.order)} streamed units in pinned host memory")
    pinned = {t for u in probe.order[:2] for t in info._streamer.pinned[u]}
    read.clear()
    assert torch.equal(forward("flux", model), expected) and torch.equal(forward("flux", model), expected)
    assert read and not pinned & set(read)                  # the pinned units never read from the file again
