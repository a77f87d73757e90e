"""The decode step's fixed shapes: low-rank adapters in per-layer rank pools, rows selecting their own ranks with
per-row tensors. Rows join and leave at every step, adapters attach while rows run (the pools grow), and every row
stays PEFT's, alone, at every step."""

from __future__ import annotations

import itertools
import shutil
from types import SimpleNamespace

import pytest
import torch
from peft import LoHaConfig, LoKrConfig
from torch.profiler import profile

from bench.mixed_decode import SYNC_OPS, CountTransfers
from server.adapters.kinds.base import PoolSpan
from server.adapters.kinds.lokr import LoKrLayer
from server.adapters.mixing import MIN_CAPACITY, MixedLinear, MixingContext, RankPool
from server.adapters.store import AdapterStore
from server.demo.tiny import save_adapter
from server.engine.kv_cache import BLOCK_SIZE
from server.engine.runner import ModelRunner, PromptSequence
from server.model import encode_prompt, load_tokenizer
from tests.builders import ATTN
from tests.conftest import DTYPE, private_model
from tests.reference import reference_logits

# float32's exactness (and float32 buffers) is what these tests hold the decode step to; bfloat16 and float16 are
# held to their tolerances by the other files (MIXSERVE_TEST_DTYPE, make gpu-check's "tests bf16")
pytestmark = pytest.mark.skipif(DTYPE != torch.float32, reason="float32 exactness of the decode step's paths")
ATOL = 1e-5
# (prompt, {adapter: weight}), joining one per step; lora.patterns has other ranks and scales on some layers
ROWS = [
    ("The first row.", {"lora": 1.0}),
    ("Base only", {}),
    ("Mixing every kind", {"shira": 1.0, "oft": 1.0, "lora": 1.0, "adalora": 1.0, "loha": 1.0, "lokr": 1.0}),
    ("Weighted", {"lora": 0.5, "loha": -1.25}),
    ("x", {"adalora": 1.0, "lora.patterns": 1.0}),
    ("A longer prompt for a late row", {"lora.patterns": 0.7, "lokr": 1.0}),
    ("LoHa alone", {"loha": 1.0}),
    ("Two LoRAs", {"lora": 1.0, "lora.patterns": 1.0}),
]
FIRST_LOADED = ["lora", "shira", "oft", "lokr"]  # the others attach while rows decode


def _each_row_is_the_reference(world, rows) -> None:
    """rows: (seq, weights, the logits seen at each step): each step's logits and greedy token the reference's."""
    for seq, weights, seen in rows:
        prompt = seq.request.prompt_ids
        expected = reference_logits(
            world.model_dir, world.store, list(weights), prompt + seq.tokens[:-1], weights=weights
        )[len(prompt) - 1 :]
        torch.testing.assert_close(torch.stack(seen), expected, atol=ATOL, rtol=0)
        assert seq.tokens == expected.argmax(-1).tolist()


def _prefill_and_decode_twice(runner, seqs) -> list[list[torch.Tensor]]:
    """Each row's logits of a prefill and two greedy decode steps."""
    seen = [[row] for row in runner.prefill(seqs)]
    for _ in range(2):
        for seq, logits in zip(seqs, seen, strict=True):
            seq.tokens.append(int(logits[-1].argmax()))
        for logits, row in zip(seen, runner.decode(), strict=True):
            logits.append(row)
    return seen


def _rows_are_the_reference(world, seqs, rows, seen) -> None:
    """rows: (prompt, weights) of seqs; seen: each row's logits at each step, held to PEFT's of its tokens."""
    for seq, (_, weights), logits in zip(seqs, rows, seen, strict=True):
        prompt = seq.request.prompt_ids
        expected = reference_logits(world.model_dir, world.store, list(weights), prompt + seq.tokens, weights=weights)
        torch.testing.assert_close(torch.stack(logits), expected[len(prompt) - 1 :], atol=ATOL, rtol=0)


def _sequence(registry, prompt: str, weights: dict[str, float], tokenizer) -> PromptSequence:
    loaded = registry.load_blocking(list(weights)) if weights else []
    seq = PromptSequence(encode_prompt(tokenizer, prompt), tuple(a.slot for a in loaded))
    seq.weights = tuple(weights[a.name] for a in loaded)
    return seq


def test_rows_joining_and_leaving_every_step_each_equal_the_reference(llama):
    runner, registry, tokenizer = llama.runner()
    registry.load_blocking(FIRST_LOADED)
    pending = list(ROWS)
    running: list[tuple[PromptSequence, dict, list[torch.Tensor]]] = []
    done: list[tuple[PromptSequence, dict, list[torch.Tensor]]] = []
    capacities = set()
    for step in range(12):
        if pending:  # one row joins
            prompt, weights = pending.pop(0)
            seq = _sequence(registry, prompt, weights, tokenizer)
            logits = runner.prefill([seq])[0]
            seq.tokens.append(int(logits.argmax()))
            running.append((seq, weights, [logits]))
        if step % 2 and len(running) > 2:  # and every other step the oldest leaves
            done.append(running.pop(0))
            runner.release(done[-1][0])
        logits = runner.decode()
        assert [seq for seq, _, _ in running] == runner.rows
        for (seq, _, seen), row in zip(running, logits, strict=True):
            seen.append(row)
            seq.tokens.append(int(row.argmax()))
        capacities |= {m.pool.capacity for m in runner.model.modules() if hasattr(m, "pool")}
    for seq, _, _ in running:
        runner.release(seq)
    assert len(capacities) > 2, "adapters attached while rows ran should have grown the pools"
    _each_row_is_the_reference(llama, done + running)


# OFT and LoKr rows at weights (negative ones too), one joining and one leaving at each step: a LoKr row's factors
# are stacked per batch composition (two LoKr adapters on up_proj: two passes; lokr.decomposed's factors have other
# shapes than lokr's: a pass each), so the composition changes at every step
ROTATING_ROWS = [
    ("OFT and LoKr", {"oft": 1.0, "lokr": 1.0}),
    ("Negative OFT", {"oft": -0.6, "lokr.decomposed": 1.0}),
    ("Two LoKr", {"lokr": 0.7, "lokr.decomposed": -1.5}),
    ("Base only", {}),
    ("Two OFTs and a LoKr", {"oft": 1.0, "oft.by-rank": 0.5, "lokr": -0.4}),
    ("LoKr alone", {"lokr": 1.0}),
    ("Every kind", {"oft.shared-coft": 1.0, "lokr": 1.0, "lokr.decomposed": 1.0, "lora": 1.0, "loha.dense": 0.8}),
]


def test_oft_and_lokr_rows_stay_exact_while_the_composition_changes_every_step(llama):
    runner, registry, tokenizer = llama.runner()
    pending = list(ROTATING_ROWS)
    running: list[tuple[PromptSequence, dict, list[torch.Tensor]]] = []
    done: list[tuple[PromptSequence, dict, list[torch.Tensor]]] = []
    compositions = []
    for _ in range(len(ROTATING_ROWS) + 2):  # the last steps only take rows out, down to one
        if len(running) > 2 or (not pending and len(running) > 1):  # one leaves
            done.append(running.pop(0))
            runner.release(done[-1][0])
        if pending:  # one joins
            prompt, weights = pending.pop(0)
            seq = _sequence(registry, prompt, weights, tokenizer)
            logits = runner.prefill([seq])[0]
            seq.tokens.append(int(logits.argmax()))
            running.append((seq, weights, [logits]))
        compositions.append(tuple(id(seq) for seq, _, _ in running))
        for (seq, _, seen), row in zip(running, runner.decode(), strict=True):
            seen.append(row)
            seq.tokens.append(int(row.argmax()))
    for seq, _, _ in running:
        runner.release(seq)
    assert all(a != b for a, b in itertools.pairwise(compositions)), compositions
    _each_row_is_the_reference(llama, done + running)


@pytest.mark.parametrize("memory", ["enough", "none"])
def test_freed_ranks_are_packed_away_and_what_they_held_never_reaches_a_row(llama, monkeypatch, memory):
    """A detached adapter's ranks go back to the pool, which moves the spans after them down onto them in place:
    also where the device has no memory for a pool's halving (which then keeps its capacity). A row never reads
    the free ranks left above, whatever their A holds (they are selected out, not multiplied by zero; their B is
    zero), and rows of an adapter attached again are PEFT's. lora.patterns stays, so that the pools keep their
    tensors (an emptied pool frees them)."""
    runner, registry, tokenizer = llama.runner()
    freed = {a.slot for a in registry.load_blocking(["adalora", "loha", "lora", "lora.patterns"]) if "lora" in a.name}
    freed -= {registry.get("lora.patterns").slot}
    pools = [p for p in _pools(runner) if p.spans.keys() - freed]
    before = {id(p): (p.capacity, {s: span[0] for s, span in p.spans.items() if s not in freed}) for p in pools}
    if memory == "none":

        def no_memory(self, *args, **kwargs):  # what the CPU's allocator raises (a device's: torch.OutOfMemoryError)
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: injected")

        monkeypatch.setattr(RankPool, "_repack", no_memory)
    assert registry.unload("lora", set()) and registry.unload("adalora", set())
    _device_bytes_agree(runner, registry)
    monkeypatch.undo()
    moved = [p for p in pools if {s: span[0] for s, span in p.spans.items()} != before[id(p)][1]]
    halved = [p for p in pools if p.capacity < before[id(p)][0]]
    assert moved and (not halved if memory == "none" else halved)
    with torch.inference_mode():
        for pool in pools:
            spans = sorted(pool.spans.values())
            assert [start for start, _, _ in spans] == list(itertools.accumulate([0] + [w for _, w, _ in spans[:-1]]))
            end = spans[-1][0] + spans[-1][1]
            assert not pool.b_t[end:].any()
            pool.a[end:] = float("inf")  # the worst the free ranks could hold
    rows = [("Base only", {}), ("Weighted", {"loha": -1.25}), ("Again", {"lora": 0.5, "loha": 1.0})]
    seqs = [_sequence(registry, prompt, weights, tokenizer) for prompt, weights in rows]
    seen = _prefill_and_decode_twice(runner, seqs)
    _rows_are_the_reference(llama, seqs, rows, seen)


def _pools(runner) -> list:
    return [m.pool for m in runner.model.modules() if hasattr(m, "pool")]


def _storages(tensors) -> dict[int, int]:
    """data_ptr -> bytes of each distinct storage under tensors."""
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


def _device_bytes_agree(runner, registry) -> None:
    """Each pooled adapter's weights are views of its pools (no other copy), and what the registry counts for the
    resident adapters is what they occupy: their pool spans plus their own tensors."""
    pools = [p for p in _pools(runner) if p.capacity]
    pool_storages = _storages(t for p in pools for t in (p.a, p.b_t))
    own, spans = [], 0
    for adapter in registry.loaded():
        for layer in adapter.built.layers.values():
            if isinstance(layer.low_rank, PoolSpan):
                a, b, _ = layer.low_rank
                assert _storages((a, b)).keys() <= pool_storages.keys(), "a pooled adapter's weights are the pool's"
                spans += a.nbytes + b.nbytes
            else:
                assert layer.low_rank is None, "a low-rank adapter on a wrapped layer is in its pool"
                own += layer.tensors()
    assert (sum(p.nbytes for p in pools), spans) == registry.model.rank_pool_bytes()
    own_bytes = _storages(own)
    assert not own_bytes.keys() & pool_storages.keys()
    assert sum(a.nbytes for a in registry.loaded()) == spans + sum(t.nbytes for t in own)
    assert sum(pool_storages.values()) == sum(p.nbytes for p in pools)  # the slack: p.nbytes minus the spans


def test_a_pooled_adapter_is_on_the_device_once_and_pools_give_memory_back(llama):
    """Loading copies each low-rank adapter into its pools and drops its own copy; evicting gives it its weights
    back (the host tier keeps them) and shrinks the pools; reloaded, it is PEFT's again, as are rows that decoded
    while the pools shrank around them."""
    runner, registry, tokenizer = llama.runner()
    registry.host_cache = 1 << 30
    names = ["lora", "loha", "adalora", "lora.patterns", "lokr"]
    registry.load_blocking(names)
    _device_bytes_agree(runner, registry)
    before = {id(p): p.capacity for p in _pools(runner)}
    assert max(before.values()) > MIN_CAPACITY, "the adapters should have grown some pool past its smallest size"

    rows = [("Stays", {"loha": 1.0}), ("Base only", {})]
    seqs = [_sequence(registry, prompt, weights, tokenizer) for prompt, weights in rows]
    seen = [[row] for row in runner.prefill(seqs)]
    for step in range(3):
        for seq, logits in zip(seqs, seen, strict=True):
            seq.tokens.append(int(logits[-1].argmax()))
        if step == 1:  # evicted while the rows decode: loha's spans move under them, in place or repacked
            slot, pools = registry.get("loha").slot, [p for p in _pools(runner) if registry.get("loha").slot in p.spans]
            at = {id(p): (p.a, p.spans[slot][0]) for p in pools}
            for adapter in registry.loaded():
                if adapter.name != "loha":
                    registry._evict(adapter)
            assert {a.name for a in registry.loaded()} == {"loha"}
            assert any(p.a is at[id(p)][0] and p.spans[slot][0] < at[id(p)][1] for p in pools), "moved in place"
            _device_bytes_agree(runner, registry)
        for logits, row in zip(seen, runner.decode(), strict=True):
            logits.append(row)
    for seq in seqs:
        runner.release(seq)
    _rows_are_the_reference(llama, seqs, rows, seen)

    after = {id(p): p for p in _pools(runner)}
    assert any(after[k].capacity < c for k, c in before.items()), "evictions should have shrunk some pool"
    for pool in after.values():  # each holds more than a quarter of its ranks, or is the smallest, or freed
        assert pool.capacity == 0 if not pool.spans else pool.capacity <= MIN_CAPACITY or pool.held > pool.capacity // 4
    assert all(registry.describe(name)["state"] == "host" for name in names if name != "loha")

    reloaded = {"lora": 0.5, "adalora": 1.0, "lora.patterns": 1.0}  # from the host tier, its weights intact
    seq = _sequence(registry, "Back again", reloaded, tokenizer)
    _device_bytes_agree(runner, registry)
    seen = [runner.prefill([seq])[0]]
    seq.tokens.append(int(seen[-1].argmax()))
    seen.append(runner.decode()[0])
    prompt = seq.request.prompt_ids
    expected = reference_logits(llama.model_dir, llama.store, list(reloaded), prompt + seq.tokens, weights=reloaded)
    torch.testing.assert_close(torch.stack(seen), expected[len(prompt) - 1 :], atol=ATOL, rtol=0)


def test_a_pool_halves_when_a_quarter_full_and_frees_its_tensors_when_empty():
    layer = torch.nn.Linear(8, 4)
    pool = RankPool(layer, MixingContext())
    for slot, width in enumerate([16, 16, 4, 8]):  # grows 16 -> 32 -> 64 (36, then 44 ranks held)
        pool.add(slot, torch.randn(width, 8), torch.randn(4, width), 1.0, (slot,))
    assert pool.capacity == 64
    capacities = []
    for slot in (0, 1, 3, 2):
        pool.remove(slot)
        capacities.append(pool.capacity)
    assert capacities == [64, 32, 16, 0]  # 28 ranks left of 64 stay; 12 of 64 halve; 4 of 32 halve; none: freed
    assert pool.nbytes == 0 and pool.layout is None


@pytest.mark.parametrize("temporary", ["enough memory", "none"])
def test_a_pool_packs_its_spans_after_a_detach_as_if_the_adapter_had_never_been_loaded(monkeypatch, temporary):
    """A gap would widen the run of ranks a pass computes (it computes the run where the ranks it needs fill over
    half of it) and make which ranks it computes depend on the load history. Spans move down by less than their
    width (in chunks, or through a temporary copy where that saves many chunks, if there is memory for it), by more,
    and not at all."""
    torch.manual_seed(0)
    widths = [2, 32, 16, 3, 8]
    factors = {slot: (torch.randn(width, 8), torch.randn(4, width)) for slot, width in enumerate(widths)}
    context = MixingContext()
    pool = RankPool(torch.nn.Linear(8, 4), context)
    for slot in (3, 0, 4, 1, 2):
        pool.add(slot, *factors[slot], 1.0, (slot,))
    if temporary == "none":

        def no_memory(self, *args, **kwargs):
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: injected")

        monkeypatch.setattr(torch.Tensor, "clone", no_memory)
    for freed in (0, 2, 4):  # 2 ranks before 59 (the 32 move by 2: in 16 chunks), then 16 in the middle, the last
        held = pool.spans.keys() - {freed}
        pool.remove(freed)
        fresh = RankPool(torch.nn.Linear(8, 4), context)
        for slot in sorted(held):
            fresh.add(slot, *factors[slot], 1.0, (slot,))
        assert pool.spans == fresh.spans and pool.layout is fresh.layout
        for slot in held:
            a, b, _ = pool.factors(slot)
            assert torch.equal(a, factors[slot][0]) and torch.equal(b, factors[slot][1])
        end = sum(widths[slot] for slot in held)
        assert not pool.b_t[end:].any()


def test_a_pool_that_cannot_shrink_keeps_its_capacity_and_its_adapters(monkeypatch):
    """An eviction runs when device memory is short: the halving's copy failing must not fail the detach."""
    pool = RankPool(torch.nn.Linear(8, 4), MixingContext())
    factors = {slot: (torch.randn(width, 8), torch.randn(4, width)) for slot, width in enumerate([16, 16, 4, 8])}
    for slot, (a, b) in factors.items():
        pool.add(slot, a, b, 1.0, (slot,))

    def no_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("injected: CUDA out of memory")

    monkeypatch.setattr(RankPool, "_repack", no_memory)
    for slot in (0, 1, 3):
        pool.remove(slot)
    assert pool.capacity == 64 and set(pool.spans) == {2} and pool.held == 4
    a, b, _ = pool.factors(2)
    assert torch.equal(a, factors[2][0]) and torch.equal(b, factors[2][1])
    start, width, _ = pool.spans[2]
    assert not pool.b_t[start + width :].any() and not pool.b_t[:start].any()  # freed ranks add 0


def test_a_decode_step_copies_its_inputs_in_once_and_never_waits(llama):
    """ids, positions, the slots written, the blocks read and the blocks to zero go in one staged copy, whether or
    not a row starts a block; the pass itself reads nothing back (sampling's one sync is the step's). The first
    step of a composition also copies in its plan's per-row tensors (not counted here: one per rank layout and row
    pattern, once)."""
    runner, registry, tokenizer = llama.runner()
    rows = [_sequence(registry, prompt, weights, tokenizer) for prompt, weights in ROWS[:4]]
    for seq, logits in zip(rows, runner.prefill(rows), strict=True):
        seq.tokens.append(int(logits.argmax()))
    logits = runner.decode()  # the composition's first step
    for seq, row in zip(rows, logits, strict=True):
        seq.tokens.append(int(row.argmax()))
    started_a_block = False
    for _ in range(BLOCK_SIZE):
        started_a_block |= runner.blocks_to_decode() > 0
        with CountTransfers(runner.device) as transfers, profile() as prof:
            logits = runner.decode()
        assert transfers.copies_in == 1
        assert transfers.tolist == 0
        assert not [e.name for e in prof.events() if e.name in SYNC_OPS]
        for seq, row in zip(rows, logits, strict=True):
            seq.tokens.append(int(row.argmax()))
    assert started_a_block
    for seq in rows:
        runner.release(seq)


def test_blocks_handed_out_in_decode_are_zeroed_also_when_the_step_fails(llama):
    """Every KV block but the first poisoned (NaN: what an overflowing earlier occupant, or storage never written,
    leaves); a short row crosses into a new block beside a longer one, and the step that hands that block out
    fails once before its copy in (the engine then runs the step again): the logits are the clean cache's."""

    def run(poison: bool) -> torch.Tensor:
        runner, _, _ = llama.runner()
        if poison:
            for cache in (*runner.cache.keys.values(), *runner.cache.values.values()):
                cache[1:] = float("nan")
        rows = [PromptSequence(list(range(3, 3 + 14))), PromptSequence(list(range(5, 5 + 40)))]
        for seq, logits in zip(rows, runner.prefill(rows), strict=True):
            seq.tokens.append(int(logits.argmax()))
        out, failed = [], False
        for _ in range(6):  # the short row starts its second block at its 17th token
            if poison and not failed and runner.blocks_to_decode():
                failed, copy_in = True, runner._copy_in

                def fail(parts):
                    raise RuntimeError("a transient failure while staging")

                runner._copy_in = fail
                with pytest.raises(RuntimeError):
                    runner.decode()
                runner._copy_in = copy_in
            out.append(runner.decode())
            for seq, row in zip(rows, out[-1], strict=True):
                seq.tokens.append(int(row.argmax()))
        assert failed or not poison
        for seq in rows:
            runner.release(seq)
        return torch.stack(out)

    assert torch.equal(run(poison=True), run(poison=False))


def test_a_decode_pass_computes_only_the_ranks_of_the_adapters_its_rows_use(llama, monkeypatch):
    """Resident adapters that no row of the batch uses cost (next to) nothing, else every row would pay for every
    adapter loaded: on each layer the pass computes the ranks of the adapters its rows use there (at least
    MIN_CAPACITY), or the run of ranks they span where they fill over half of it — side by side, or apart with idle
    ones between — and every row stays PEFT's."""
    runner, registry, tokenizer = llama.runner()
    registry.load_blocking(["lora", "adalora", "loha", "lora.patterns", "lora.rs-bias"])
    rows = [("Apart", {"lora": 0.5, "loha": 1.0}), ("One", {"lora.patterns": 1.0}), ("Base", {})]
    seqs = [_sequence(registry, prompt, weights, tokenizer) for prompt, weights in rows]
    slots, computed, add_to = {s for seq in seqs for s in seq.slots}, [], RankPool.add_to

    def counting(pool, y, x, own, coefficients, columns):
        used = {k for slot in slots & pool.spans.keys() for k in range(pool.spans[slot][0], sum(pool.spans[slot][:2]))}
        ranks = range(pool.layout.capacity) if columns is None else columns.ranks
        assert used <= set(ranks) and own.shape[1] == len(ranks) <= max(MIN_CAPACITY, 2 * len(used))
        computed.append((len(ranks), pool.layout.capacity))
        return add_to(pool, y, x, own, coefficients, columns)

    monkeypatch.setattr(RankPool, "add_to", counting)
    seen = _prefill_and_decode_twice(runner, seqs)
    assert any(got < resident for got, resident in computed), "some layer should hold idle adapters"
    _rows_are_the_reference(llama, seqs, rows, seen)


def test_a_pass_computes_its_adapters_ranks_side_by_side_apart_or_padded_and_each_row_gets_its_own():
    """RankLayout.columns on a pool of three adapters (ranks 0-15, 16-79, 80-95), and each row's delta through
    every kind of columns against B(A x) * scale * weight of its own adapters — also after another adapter took the
    span of one the last pass copied out."""
    torch.manual_seed(0)
    pool = RankPool(torch.nn.Linear(32, 24), MixingContext())
    factors = {slot: (torch.randn(w, 32), torch.randn(24, w), 0.5 + slot) for slot, w in enumerate([16, 64, 16])}
    for slot, (a, b, scale) in factors.items():
        pool.add(slot, a, b, scale, (slot,))
    layout = pool.layout
    assert layout.columns({0, 1, 2}) is None  # all of them: the pool's views
    assert layout.columns({1}) == tuple(range(16, 80))  # one run: views
    assert layout.columns({0, 1}) == tuple(range(80))
    assert layout.columns({0, 2}) == (*range(16), *range(80, 96))  # apart, a third of the run: copied out
    pool.add(3, torch.randn(4, 32), torch.randn(24, 4), 1.0, (3,))  # ranks 96-99: padded to 16, a run
    assert pool.layout.columns({3}) == tuple(range(84, 100))
    a, b, scale = pool.factors(3)  # views of the pool until it next changes
    factors[3] = (a.clone(), b.clone(), scale)

    def each_row_gets_its_own(combos, weights, ranks):
        x = torch.randn(len(combos), 1, 32)
        own, coefficients, columns = pool.layout.row_tensors(combos, weights, torch.device("cpu"))
        assert columns.ranks == ranks
        y = torch.zeros(len(combos), 1, 24)
        pool.add_to(y, x, own, coefficients, columns)
        for row, (slots, row_weights) in enumerate(zip(combos, weights, strict=True)):
            expected = sum(
                (x[row] @ factors[s][0].T @ factors[s][1].T * factors[s][2] * w for s, w in zip(slots, row_weights)),
                torch.zeros(1, 24),
            )
            torch.testing.assert_close(y[row], expected, atol=1e-5, rtol=1e-5)

    apart = (*range(16), *range(80, 100))
    each_row_gets_its_own(((0, 2), (2,), (), (3,)), ((1.0, -0.5), (2.0,), (), (1.0,)), apart)
    pool.remove(0)  # another adapter of the same width takes its span: the same ranks, other weights
    pool.add(4, torch.randn(16, 32), torch.randn(24, 16), 3.0, (0.5,))
    factors[4] = pool.factors(4)
    assert pool.spans[4][:2] == (0, 16)
    each_row_gets_its_own(((4, 2), (2,), (), (3,)), ((1.0, -0.5), (2.0,), (), (1.0,)), apart)


# Layers that carry the same adapter slots share one decode plan when their adapters' traits agree (MixedLinear's
# signature): a second LoKr factor shape on a layer, a LoHa pooled on some layers and dense on others
SHARING = {
    "lokr.f4": (
        LoKrConfig(r=2, alpha=4, decompose_factor=4, target_modules=["up_proj", "q_proj"], init_weights=False),
        0.5,
    ),
    "lokr.mid": (LoKrConfig(r=4, alpha=8, target_modules=["up_proj", "q_proj", "o_proj"], init_weights=False), 0.3),
    # r x r ranks x (in + out) under in x out on q and o (64 x 64): pooled there; dense on k and v (64 -> 32)
    "loha.r5": (LoHaConfig(r=5, alpha=4, target_modules=ATTN, init_weights=False), 1.0),
}


@pytest.fixture(scope="module")
def sharing_world(llama, tmp_path_factory):
    store = tmp_path_factory.mktemp("sharing") / "store"
    shutil.copytree(llama.store, store)
    for seed, (name, (config, scale)) in enumerate(SHARING.items(), start=101):
        save_adapter(llama.model_dir, config, store / name, seed=seed, base_name=llama.model_dir.name, scale=scale)
    return SimpleNamespace(model_dir=llama.model_dir, store=store)


def _decode_joining(world, registry, runner, tokenizer, rows, steps: int, between=None) -> None:
    """Rows join one a step and the oldest leaves every other step; each row held to PEFT at every step."""
    pending, running, done = list(rows), [], []
    for step in range(steps):
        if pending:
            prompt, weights = pending.pop(0)
            seq = _sequence(registry, prompt, weights, tokenizer)
            logits = runner.prefill([seq])[0]
            seq.tokens.append(int(logits.argmax()))
            running.append((seq, weights, [logits]))
        if step % 2 and len(running) > 2:
            done.append(running.pop(0))
            runner.release(done[-1][0])
        if between is not None:
            between(step)
        for (seq, _, seen), row in zip(running, runner.decode(), strict=True):
            seen.append(row)
            seq.tokens.append(int(row.argmax()))
    for seq, _, _ in running:
        runner.release(seq)
    _each_row_is_the_reference(world, done + running)


def test_lokr_of_two_factor_shapes_on_a_layer_at_weights_while_an_idle_one_is_evicted_and_reloaded(sharing_world):
    model, registry = private_model(sharing_world.model_dir, AdapterStore(sharing_world.store))
    runner, tokenizer = ModelRunner(model, registry.context), load_tokenizer(sharing_world.model_dir)
    registry.load_blocking(["lokr", "lokr.mid", "lokr.decomposed", "lokr.f4", "loha.r5", "lora.patterns"])
    shapes = [
        {(tuple(a.w1.shape), tuple(a.w2_t.shape)) for a in m.adapters.values() if isinstance(a, LoKrLayer)}
        for m in model.modules()
        if isinstance(m, MixedLinear)
    ]
    assert any(len(s) >= 2 for s in shapes), "some layer should hold LoKr adapters of two factor shapes"
    rows = [
        ("Three LoKr", {"lokr": 0.7, "lokr.f4": -1.3, "lokr.decomposed": 1.0}),
        ("F4 alone", {"lokr.f4": 1.0}),
        ("Reverse", {"lokr.decomposed": -0.5, "lokr": 1.0}),
        ("Loha r5 and lokr", {"loha.r5": 1.0, "lokr": 1.0}),
        ("Loha r5 weighted", {"loha.r5": -0.7, "lora.patterns": 0.3}),
        ("Base", {}),
        ("f4 then lokr", {"lokr.f4": 2.0, "lokr": -0.25}),
    ]

    def churn(step: int) -> None:  # the idle LoKr leaves and comes back while the batch's plans are cached
        if "lokr.mid" in {a.name for a in registry.loaded()}:
            registry.unload("lokr.mid", set())
        else:
            registry.load_blocking(["lokr.mid"])

    _decode_joining(sharing_world, registry, runner, tokenizer, rows, 10, churn)


def test_the_same_slots_pooled_on_some_layers_and_dense_on_others_plan_apart(sharing_world):
    model, registry = private_model(sharing_world.model_dir, AdapterStore(sharing_world.store))
    runner, tokenizer = ModelRunner(model, registry.context), load_tokenizer(sharing_world.model_dir)
    registry.load_blocking(["loha.r5", "lora.rs-bias"])
    layers = [m for name, m in model.named_modules() if isinstance(m, MixedLinear) and ".0.self_attn" in name]
    assert len({tuple(sorted(m.adapters)) for m in layers}) == 1
    assert len({tuple(sorted((s, s in m.pool.spans) for s in m.adapters)) for m in layers}) == 2
    rows = [
        ("Loha r5", {"loha.r5": 1.0}),
        ("Loha r5 neg + rs-bias", {"loha.r5": -0.7, "lora.rs-bias": 1.0}),
        ("rs-bias only", {"lora.rs-bias": 0.5}),
        ("Base", {}),
        ("both", {"lora.rs-bias": -1.0, "loha.r5": 2.0}),
    ]
    _decode_joining(sharing_world, registry, runner, tokenizer, rows, 8)


def test_pruned_adalora_and_oft_blocks_that_differ_per_layer(llama):
    runner, registry, tokenizer = llama.runner()
    rows = [
        ("Pruned", {"adalora.pruned": 1.0, "lokr": 0.5}),
        ("By-rank OFT", {"oft.by-rank": 0.6, "shira": -1.0, "lokr.decomposed": 1.0}),
        ("Pruned weighted", {"oft.by-rank": 1.0, "adalora.pruned": -2.0}),
        ("Base", {}),
        ("shira", {"shira": 1.0, "adalora.pruned": 1.0, "lokr": 1.0, "lokr.decomposed": -0.3}),
    ]
    _decode_joining(llama, registry, runner, tokenizer, rows, 8)
