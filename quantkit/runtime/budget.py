"""Budget mode and the pool's cache: which units stay in memory under ``max_memory``, and why.

A model's memory in budget mode is four terms: the tensors outside every unit (``fixed``: tied
weights, tensors directly on a module that holds the block lists), the resident units, the streamed
units in flight (the one running and, with prefetch, the next one read meanwhile: the two largest
streamed units), and dequantization's work (the largest FP8 weight made in the compute dtype, plus
one chunk of float32 and int16 work: ``weights.dequantized``). ``plan`` keeps units resident in
the model's order (the order its modules are registered: ``stream_units``), each one that fits
beside what the rest need in flight, so the choice is deterministic and the sum never exceeds the
budget. A budget that holds
everything is resident mode; one that cannot hold the largest unit in flight is refused before
anything is read, naming the unit and the smallest budget that works.

``UnitCache`` is a ``Pool``'s memory: units of any of its models stay in memory after they run while
they fit. ``Eviction.STABLE`` (the default) makes room for a unit only from the units of models idle
since this model's previous call began (or, on its first call, since it began), the least recently
used first, and keeps the unit out where that is not enough: a model never evicts its own units, nor
those of a model used in between, so with two models used in turn (a ControlNet and its
transformer, every step) the set kept is the same on every call and each call re-reads only what
does not fit, while a model left unused gives its room to the next one after one call.
``Eviction.LRU`` evicts the least recently used unit of any model, this one's included: two models
that do not fit together used in turn (or one model larger than the pool, run again) then read every
unit on every call, each evicting the unit the scan needs next (``benchmarks/runtime_pool.py``
measures both).
"""
from __future__ import annotations

import enum
import re
from collections import OrderedDict
from dataclasses import dataclass

from ..errors import OptionsError
from ..options import parse_size


def budget_bytes(max_memory: int | str) -> int:
    """``max_memory`` in bytes: an int, or a size such as "8GB", "500MB", "2GiB" (``parse_size``)."""
    if isinstance(max_memory, bool) or not isinstance(max_memory, (int, str)):
        raise OptionsError(f"max_memory {max_memory!r}: give bytes (an int) or a size such as 8GB")
    value = parse_size(max_memory) if isinstance(max_memory, str) else max_memory
    if value <= 0:
        raise OptionsError(f"max_memory {max_memory!r} is not positive", hint="give a size such as 8GB or 500MB")
    return value


def size(n: int) -> str:
    """Bytes as people read them (decimal units, as ``parse_size`` takes them).

    >>> size(5_900_000_000), size(12_300_000), size(900)
    ('5.9 GB', '12.3 MB', '900 B')
    """
    for unit, factor in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= factor:
            return f"{n / factor:.1f} {unit}"
    return f"{n} B"


def ranges(names: list[str]) -> str:
    """Unit names with consecutive block numbers joined.

    >>> ranges(["embed", "blocks.0", "blocks.1", "blocks.2", "blocks.5", "head"])
    'embed, blocks.0-2, blocks.5, head'
    """
    out: list[list] = []           # [prefix, first, last] or [name, None, None]
    for name in names:
        m = re.fullmatch(r"(.*)\.(\d+)", name)
        if m and out and out[-1][0] == m.group(1) and out[-1][2] == int(m.group(2)) - 1:
            out[-1][2] = int(m.group(2))
        elif m:
            out.append([m.group(1), int(m.group(2)), int(m.group(2))])
        else:
            out.append([name, None, None])
    return ", ".join(p if a is None else f"{p}.{a}" if a == b else f"{p}.{a}-{b}" for p, a, b in out)


@dataclass(frozen=True)
class Plan:
    """Which units stay resident under ``budget`` bytes, and the terms of the sum."""

    budget: int
    fixed: int                       # bytes outside every unit, always held
    work: int                        # dequantization's temporaries, reserved
    units: dict[str, int]            # unit -> bytes held while it is in memory, in the model's order
    resident: tuple[str, ...]
    depth: int                       # streamed units in flight at once (2 with prefetch)

    @property
    def streamed(self) -> tuple[str, ...]:
        return tuple(u for u in self.units if u not in self.resident)

    @property
    def resident_bytes(self) -> int:
        return self.fixed + sum(self.units[u] for u in self.resident)

    @property
    def window(self) -> int:
        """Bytes of the streamed units in flight at once, at most (the ``depth`` largest)."""
        return sum(sorted((self.units[u] for u in self.streamed), reverse=True)[:self.depth])

    @property
    def peak(self) -> int:
        """The most the runtime holds, dequantization's work included: at most ``budget``."""
        return self.resident_bytes + self.window + self.work

    def describe(self) -> str:
        """Which units stay and why, in one line."""
        if not self.streamed:
            return (f"all {len(self.units)} units resident ({size(self.peak)} of {size(self.budget)}, "
                    "dequantization's work included): the budget holds everything")
        kept = ranges(list(self.resident)) if self.resident else "none"
        return (f"resident: {kept} ({size(self.resident_bytes)} of {size(self.budget)}); "
                f"streamed: {ranges(list(self.streamed))}; why: in the model's order, each unit stays while it "
                f"fits beside the {self.depth} largest streamed units in flight ({size(self.window)}) and "
                f"dequantization's work ({size(self.work)})")


def plan(units: dict[str, int], fixed: int, work: int, budget: int, prefetch: bool = True) -> Plan:
    """The resident set under ``budget``; ``OptionsError`` naming the smallest budget if none fits.

    >>> plan({"a": 10, "b": 10, "c": 10, "d": 10}, fixed=1, work=2, budget=33).resident   # 1 + 10 + 2 x 10 + 2
    ('a',)
    """
    depth = 2 if prefetch else 1
    everything = Plan(budget, fixed, work, units, tuple(units), depth)
    if everything.peak <= budget or not units:
        if everything.peak > budget:
            raise OptionsError(f"a memory budget of {size(budget)} is below the {size(everything.peak)} this model "
                               "holds outside its blocks",
                               hint=f"give a budget of {everything.peak} bytes or more: --max-memory, or "
                                    "max_memory= from Python")
        return everything
    largest = sorted(units.values(), reverse=True)[:depth]
    smallest = fixed + work + sum(largest)
    if budget < smallest:
        name = max(units, key=units.get)
        raise OptionsError(f"a memory budget of {size(budget)} cannot hold the largest block in flight: {name} is "
                           f"{size(units[name])}; the smallest budget that works is {size(smallest)} "
                           f"({smallest} bytes: {depth} such block{'s' if depth > 1 else ''}, "
                           f"{size(fixed)} outside the blocks, {size(work)} of dequantization work)",
                           hint=f"give a budget of {smallest} bytes or more: --max-memory, or max_memory= from Python"
                           + (", where prefetch=False keeps one block in flight" if depth > 1 else ""))
    room, used, resident = budget - fixed - work, 0, []
    for u, n in units.items():
        rest = sorted((units[v] for v in units if v != u and v not in resident), reverse=True)
        if used + n + sum(rest[:depth]) <= room:
            resident.append(u)
            used += n
    return Plan(budget, fixed, work, units, tuple(resident), depth)


class Eviction(enum.Enum):
    """Which kept unit a pool drops to make room for one that just ran."""

    STABLE = "stable"    # idle models' units, least recently used first; never the model's own
    LRU = "lru"          # the least recently used unit of any model


class UnitCache:
    """A pool's units kept in memory after they ran, evicted by ``eviction`` (``Eviction``).

    ``capacity`` is what the pool's budget leaves for kept units; ``in_flight`` counts units read
    for a call and not kept; ``held`` is everything the pool's models hold (``fixed`` included)."""

    def __init__(self, budget: int, eviction: Eviction = Eviction.STABLE):
        self.budget = budget
        self.eviction = eviction
        self.fixed = 0                 # the pool's models' tensors outside their units
        self.reserve = 0               # streamed units in flight + dequantization's work, the largest model's
        self.entries: OrderedDict = OrderedDict()     # key -> (bytes, release); oldest first
        self.cached = 0
        self.in_flight = 0
        self.peak = 0
        self.evicted: list = []        # keys in the order they were evicted (what tests and users read)
        self.models: dict = {}         # owner -> (fixed, reserve)
        self.clock = 0                 # one tick per call begun and per unit used
        self.used: dict = {}           # owner -> the tick of its last unit used
        self.calls: dict = {}          # owner -> (the tick its previous call began, the tick its call began)

    @property
    def capacity(self) -> int:
        return self.budget - self.fixed - self.reserve

    @property
    def held(self) -> int:
        return self.fixed + self.cached + self.in_flight

    def add_model(self, owner, fixed: int, reserve: int, label: str) -> None:
        """Take a model's fixed bytes and reserve; refused where the budget cannot run it."""
        need = self.fixed + fixed + max(self.reserve, reserve)
        if need > self.budget:
            raise OptionsError(f"max_memory {size(self.budget)} of this pool cannot also run {label}: it needs "
                               f"{size(need)} ({need} bytes) with the models already in it",
                               hint=f"give the pool max_memory={need} or more")
        self.fixed += fixed
        self.reserve = max(self.reserve, reserve)
        self.models[owner] = (fixed, reserve)
        self._note()

    def begin(self, owner) -> None:
        """``owner`` (a model) begins a call."""
        self.clock += 1
        _, current = self.calls.get(owner, (None, self.clock))
        self.calls[owner] = (current, self.clock)

    def touch(self, key) -> bool:
        """Whether ``key`` is kept (made the most recently used if so)."""
        self.clock += 1
        self.used[key[0]] = self.clock
        if key not in self.entries:
            return False
        self.entries.move_to_end(key)
        return True

    def admit(self, key, nbytes: int, release) -> bool:
        """Keep a unit that just ran (``nbytes``, dropped by ``release()`` when evicted), evicting
        the least recently used until it fits; False (nothing evicted) where it can never fit."""
        if key in self.entries:
            return True
        victims = self._victims(key[0], self.cached + nbytes - self.capacity)
        if victims is None:
            return False
        for old in victims:
            n, drop = self.entries.pop(old)
            drop()
            self.cached -= n
            self.evicted.append(old)
        self.entries[key] = (nbytes, release)
        self.cached += nbytes
        self.in_flight -= nbytes
        return True

    def _victims(self, owner, short: int) -> list | None:
        """Kept units to drop for ``short`` more bytes, least recently used first (with
        ``Eviction.STABLE`` only those of owners idle since ``owner``'s previous call began), or None
        where those are not enough."""
        victims, freed = [], 0
        since = self.calls.get(owner, (self.clock, self.clock))[0]
        for key, (n, _) in self.entries.items():
            if freed >= short:
                break
            if self.eviction is Eviction.LRU or (key[0] != owner and self.used.get(key[0], 0) < since):
                victims.append(key)
                freed += n
        return victims if freed >= short else None

    def count(self, nbytes: int) -> None:
        self.in_flight += nbytes
        self._note()

    def _note(self) -> None:
        self.peak = max(self.peak, self.held)

    def drop_owner(self, owner) -> None:
        """Forget ``owner`` (a model closed or freed): its kept units, its fixed bytes and reserve."""
        for key in [k for k in self.entries if k[0] == owner]:
            n, drop = self.entries.pop(key)
            drop()
            self.cached -= n
        fixed, _ = self.models.pop(owner, (0, 0))
        self.used.pop(owner, None)
        self.calls.pop(owner, None)
        self.fixed -= fixed
        self.reserve = max((r for _, r in self.models.values()), default=0)
