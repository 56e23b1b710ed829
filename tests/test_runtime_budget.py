"""quantkit.runtime's budget mode, device placement, Pool, and bounded dequantization.

What is proved, on tiny real FLUX.1 (diffusers) and Llama (transformers) models converted to FP8:
- budget mode runs to the same output, bit for bit, as resident mode (the same FP8 math) at every
  budget from the smallest that works to everything, for both models and with prefetch off;
- the resident set is the one stated (``residency`` names it), the same on every load, grows
  with the budget, and is all of the model when the budget holds everything (resident mode);
- the bytes the runtime holds (its own count, checked against the module's tensors measured by
  the test's hooks) never exceed the budget, dequantization's reserved work included;
- a budget below the largest block in flight is refused before any read, naming the block and
  the smallest budget that works (which then loads);
- ``device="cpu"`` is a device like any other; a move off the loaded device is refused;
- two models in one Pool under a budget that holds one: outputs equal each alone, blocks evicted
  least recently used first, the pool's bytes within the budget;
- chunked dequantization is bit-identical to ``quantkit.fp8.dequantize`` in every dtype,
  granularity and FP8 encoding, with float32 work bounded by the chunk.
"""
import pytest
import torch
from tiny_models import FLUX_CONFIG, build, forward, without_zero_layers

import quantkit.runtime as qr
from quantkit import fp8 as fp8math
from quantkit.errors import OptionsError
from quantkit.fp8 import Granularity
from quantkit.plan import ConvertOptions, Recipe
from quantkit.quantize import convert
from quantkit.runtime import budget as rb
from quantkit.runtime.loader import tensor_bytes
from quantkit.runtime.weights import dequantized


def _convert(root, name, seed=0):
    model = without_zero_layers(build(name, seed))
    model.save_pretrained(root / f"src-{name}-{seed}")
    out = root / f"{name}-{seed}.safetensors"
    convert(str(root / f"src-{name}-{seed}"), str(out), ConvertOptions(recipe=Recipe.COMPACT))
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget")
    return {"flux": _convert(root, "flux"), "llama": _convert(root, "llama"), "flux-b": _convert(root, "flux", 5)}


def _empty(name):
    if name == "flux":
        import diffusers
        with qr.empty_weights():
            return diffusers.FluxTransformer2DModel.from_config(dict(FLUX_CONFIG)).eval()
    with qr.empty_weights():
        return build(name).eval()


def _watch(model):
    """The most the module's tensors took while any unit ran (the test's hooks, after the runtime's)."""
    seen = {"max": 0}

    def pre(module, args):
        seen["max"] = max(seen["max"], tensor_bytes(model))
    for name in model.quantkit_runtime.units:
        model.get_submodule(name).register_forward_pre_hook(pre)
    return seen


def _plan(files, name, dtype=None):
    return qr.load(_empty(name), files[name], mode="budget", max_memory=10**12,
                   compute_dtype=dtype).quantkit_runtime.plan


def _sizes(files, name, dtype=None):
    """(the smallest budget that works, everything) for ``name`` in ``dtype``, from budget mode's own plan."""
    p = _plan(files, name, dtype)
    assert p.streamed == () and p.resident == tuple(p.units)
    top2 = sorted(p.units.values(), reverse=True)[:2]
    return p.fixed + p.work + sum(top2), p.peak


@pytest.mark.parametrize("name", ["flux", "llama"])
def test_budget_is_resident_bit_for_bit_and_within_the_budget(files, name):
    y = forward(name, qr.load(_empty(name), files[name]))
    smallest, everything = _sizes(files, name)
    budgets = [smallest, (smallest + everything) // 2, everything - 1, everything]
    kept = []
    for budget in budgets:
        model = qr.load(_empty(name), files[name], mode="budget", max_memory=budget)
        info = model.quantkit_runtime
        seen = _watch(model)
        assert torch.equal(forward(name, model), y)
        assert torch.equal(forward(name, model), y)          # streamed blocks dropped and read again
        assert info.peak_bytes + info.plan.work <= budget     # the runtime's count, work reserved
        assert seen["max"] <= info.peak_bytes                 # ...which covers what the module held
        assert info.resident_bytes == info.plan.resident_bytes
        assert set(info.units) == set(info.plan.streamed)     # the streamed ones are the hooked ones
        for u in info.plan.resident:                          # the stated resident blocks hold values
            assert not any(t.is_meta for t in model.get_submodule(u).buffers())
        kept.append(len(info.plan.resident))
        info.close()
    assert kept == sorted(kept) and kept[0] < kept[-1] == len(info.plan.units)
    smallest_info = qr.load(_empty(name), files[name], mode="budget", max_memory=smallest).quantkit_runtime
    assert "streamed: " in smallest_info.residency


def test_budget_without_prefetch_and_in_bf16(files):
    y = forward("flux", qr.load(_empty("flux"), files["flux"], compute_dtype=torch.bfloat16),
                _bf16_inputs())
    smallest, everything = _sizes(files, "flux", torch.bfloat16)
    model = qr.load(_empty("flux"), files["flux"], compute_dtype=torch.bfloat16, mode="budget", max_memory=smallest,
                    prefetch=False)
    assert model.quantkit_runtime.plan.depth == 1 and model.quantkit_runtime.plan.streamed
    assert torch.equal(forward("flux", model, _bf16_inputs()), y)
    assert model.quantkit_runtime.peak_bytes + model.quantkit_runtime.plan.work <= smallest


def test_work_in_bf16_is_the_largest_weight_alone_in_float32_it_adds_a_chunk(files):
    """E4M3 made into BF16 in place needs no float32 work: the plan reserves the largest weight in
    BF16 and nothing else; in float32 it also reserves one chunk of float32 and int16 work."""
    from safetensors import safe_open
    with safe_open(str(files["flux"]), "pt") as f:
        largest = max(f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[1] for k in f.keys()
                      if f.get_slice(k).get_dtype() == "F8_E4M3")
    assert _plan(files, "flux", torch.bfloat16).work == largest * 2
    assert _plan(files, "flux").work > largest * 4


def _bf16_inputs():
    from tiny_models import example_inputs
    return {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
            for k, v in example_inputs("flux").items()}


def test_the_resident_set_is_stated_and_deterministic(files):
    smallest, everything = _sizes(files, "flux")
    budget = (smallest + everything) // 2
    infos = [qr.load(_empty("flux"), files["flux"], mode="budget", max_memory=budget).quantkit_runtime
             for _ in range(2)]
    assert infos[0].plan.resident == infos[1].plan.resident and infos[0].residency == infos[1].residency
    text = infos[0].residency
    assert text.startswith("resident: time_text_embed") and "streamed: " in text and rb.size(budget) in text
    assert infos[0].summary()["residency"] == text and infos[0].summary()["mode"] == "budget"
    # within the budget, and no streamed block could have stayed as well (the set is maximal)
    plan = infos[0].plan
    assert plan.peak <= budget and plan.resident and plan.streamed
    for u in plan.streamed:
        rest = sorted((plan.units[v] for v in plan.streamed if v != u), reverse=True)[:2]
        assert plan.resident_bytes + plan.units[u] + sum(rest) + plan.work > budget
    everything_plan = qr.load(_empty("flux"), files["flux"], mode="budget", max_memory="1GB").quantkit_runtime
    assert "all" in everything_plan.residency and everything_plan.units == []


def test_a_budget_below_one_block_is_refused_with_the_smallest_that_works(files):
    smallest, _ = _sizes(files, "flux")
    with pytest.raises(OptionsError) as e:
        qr.load(_empty("flux"), files["flux"], mode="budget", max_memory=smallest - 1)
    message, units = str(e.value), _plan(files, "flux").units
    largest = max(units, key=units.get)
    assert f"{largest} is {rb.size(units[largest])}" in message
    assert f"({smallest} bytes" in message and e.value.exit_code == 2
    qr.load(_empty("flux"), files["flux"], mode="budget", max_memory=smallest)        # that one works
    with pytest.raises(OptionsError, match="bad size"):
        qr.load(_empty("flux"), files["flux"], mode="budget", max_memory="eight gigs")
    with pytest.raises(ValueError, match="needs max_memory"):
        qr.load(_empty("flux"), files["flux"], mode="budget")
    with pytest.raises(ValueError, match="applies to mode='budget'"):
        qr.load(_empty("flux"), files["flux"], max_memory="1GB")


def test_sizes_as_strings_and_the_plan_rule():
    assert rb.budget_bytes("8GB") == 8_000_000_000 and rb.budget_bytes(500) == 500
    p = rb.plan({"a": 10, "b.0": 30, "b.1": 10, "c": 10}, fixed=1, work=2, budget=55)
    # a (10) stays: 10 + the two largest of the rest (30 + 10) = 50 <= 52; b.0 (30) would need 40 + 20
    assert p.resident == ("a",) and p.window == 40 and p.peak <= 55
    assert rb.plan({"a": 10, "b": 10}, 0, 0, 20).streamed == ()
    with pytest.raises(OptionsError, match="b.0 is 30 B; the smallest budget that works is 43 B"):
        rb.plan({"a": 10, "b.0": 30, "b.1": 10}, fixed=1, work=2, budget=42)


def test_device_cpu_and_moves(files):
    y = forward("flux", qr.load(_empty("flux"), files["flux"]))
    smallest, _ = _sizes(files, "flux")
    model = qr.load(_empty("flux"), files["flux"], mode="budget", max_memory=smallest, device="cpu")
    assert model.quantkit_runtime.device == torch.device("cpu")
    assert torch.equal(forward("flux", model), y)
    model.to("cpu")                                              # its own device: fine
    with pytest.raises(ValueError, match="runs on the device it was loaded for"):
        model.to("meta")


def test_the_transfer_to_a_device():
    """The CPU is the host: nothing moves; another device gets a copy; CUDA's side stream only on CUDA."""
    from quantkit.runtime.streaming import Transfer
    t = {"w": torch.ones(3)}
    moved, event = Transfer(torch.device("cpu")).move(t)
    assert moved["w"] is t["w"] and event is None and Transfer(torch.device("cpu")).stream is None
    moved, event = Transfer(torch.device("meta")).move(t)
    assert moved["w"].is_meta and event is None
    assert Transfer(torch.device("meta")).arrive(moved, None) is moved


def test_two_models_in_one_pool_under_a_budget_that_holds_one(files):
    alone = {k: forward("flux", qr.load(_empty("flux"), files[k])) for k in ("flux", "flux-b")}
    p = _plan(files, "flux")      # room for one model's blocks beside both models' fixed bytes and the reserve
    one = 2 * p.fixed + p.work + sum(sorted(p.units.values(), reverse=True)[:2]) + sum(p.units.values())
    pool = qr.Pool(max_memory=one, eviction="lru")     # the LRU order this test reads (stable: test_runtime_pool_more)
    a = pool.load(_empty("flux"), files["flux"])
    b = pool.load(_empty("flux"), files["flux-b"])
    assert pool.held_bytes == pool.cache.fixed                 # loaded: nothing but what lies outside blocks
    units = list(a.quantkit_runtime.units)
    assert torch.equal(forward("flux", a), alone["flux"])
    ran = [u for _, u in pool.kept]                           # least recently used first: the order they ran
    assert sorted(ran) == sorted(units) and not pool.evicted    # all of a kept: it fits
    assert torch.equal(forward("flux", b), alone["flux-b"])
    # b's blocks evict a's, least recently used (a's, in the order they ran) first
    evicted = pool.evicted
    assert evicted and all(owner == id(a) for owner, _ in evicted)
    assert [u for _, u in evicted] == ran                       # b needed the room of all of a
    assert tensor_bytes(a) == p.fixed                           # a, unused: its scales and fixed tensors only
    assert torch.equal(forward("flux", a), alone["flux"])      # a again, re-read where evicted
    assert all(owner == id(b) for owner, _ in pool.evicted[len(evicted):])
    assert torch.equal(forward("flux", b), alone["flux-b"])
    # the pool's count and the modules' own tensors agree, and never passed the budget
    assert pool.held_bytes == tensor_bytes(a) + tensor_bytes(b)
    assert pool.peak_bytes + p.work <= pool.max_memory           # dequantization's work reserved beside it
    assert pool.peak_bytes > pool.max_memory - p.work - sum(sorted(p.units.values())[-2:])   # and it was used
    assert pool.summary()["models"] == 2
    pool.remove(a)                                              # its blocks and fixed bytes leave the pool
    assert all(owner == id(b) for owner, _ in pool.kept) and pool.held_bytes == tensor_bytes(b)
    assert torch.equal(forward("flux", b), alone["flux-b"]) and pool.summary()["models"] == 1


def test_a_pool_refuses_a_model_it_cannot_run(files):
    with pytest.raises(OptionsError, match="of this pool cannot also run FluxTransformer2DModel"):
        qr.Pool(max_memory=1000).load(_empty("flux"), files["flux"])
    with pytest.raises(ValueError, match="Pool"):
        qr.load(_empty("flux"), files["flux"], mode="pooled")


@pytest.mark.parametrize("fmt", [fp8math.E4M3FN, fp8math.E5M2])
@pytest.mark.parametrize("granularity", list(Granularity))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_chunked_dequantization_is_the_whole_one_bit_for_bit(fmt, granularity, dtype):
    x = torch.randn(300, 260, generator=torch.Generator().manual_seed(0)) * 3
    x[0, 0] = float("nan") if fmt is fp8math.E4M3FN else 0.0
    scale = fp8math.scale_from_absmax(fp8math.absmax(x.nan_to_num(), granularity), fmt)
    q = fp8math.quantize(x, scale, granularity, fmt)
    reference = fp8math.dequantize(q, scale, granularity, dtype)
    for chunk in (1, 1000, 128 * 260, 1 << 22):
        w = dequantized(q, scale, granularity, dtype, chunk=chunk)
        assert w.dtype == dtype and w.shape == q.shape
        bits = torch.int32 if dtype == torch.float32 else torch.int16
        assert torch.equal(w.view(bits), reference.view(bits))


def test_chunked_dequantization_bounds_its_float32_work(monkeypatch):
    """With a chunk of 4 rows, the float32 route (fp8.dequantize) never sees more than 4 rows: no
    whole float32 copy; E4M3 into bfloat16 takes no float32 route at all."""
    seen = []
    original = fp8math.dequantize

    def spy(q, *args, **kwargs):
        seen.append(q.shape[0])
        return original(q, *args, **kwargs)
    monkeypatch.setattr(fp8math, "dequantize", spy)
    x = torch.randn(64, 16)
    q = fp8math.quantize(x, torch.tensor(0.01))
    narrow = dequantized(q, torch.tensor(0.01), Granularity.TENSOR, torch.bfloat16, chunk=64)
    assert seen == []
    assert torch.equal(narrow.view(torch.int16), (q.float() * 0.01).to(torch.bfloat16).view(torch.int16))
    q5 = fp8math.quantize(x, torch.tensor(0.01), fmt=fp8math.E5M2)
    dequantized(q5, torch.tensor(0.01), Granularity.TENSOR, torch.bfloat16, chunk=64)
    assert seen and max(seen) == 4
