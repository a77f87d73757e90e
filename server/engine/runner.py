"""Runs the model over a batch whose rows each carry their own adapter combination.

The running sequences are `rows`, in the order they joined; each holds its keys and values in blocks of the paged
cache. A prefill pass takes new sequences (right-padded: a prompt, or a preempted sequence's prompt and tokens to
recompute) into the batch; a decode pass feeds every running sequence its last token.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from types import SimpleNamespace

import torch
from transformers import PreTrainedModel

from server.adapters.mixing import BatchPlan, MixingContext
from server.engine.attention import MaskLayout, UnsupportedModel
from server.engine.fatal import raise_if_device_fatal
from server.engine.kv_cache import BLOCK_SIZE, PagedCache, chain_keys
from server.engine.paged_attention import PagedAttention, PagedAttentionError
from server.engine.sequence import Sequence
from server.quantization import quantization_of

log = logging.getLogger(__name__)
CHECK_WINDOW = 8  # the sliding window the self-check runs with (see ModelRunner.self_check)
DEFAULT_SEQUENCE_TOKENS = 4096 + 1024  # the longest request by default: input and new tokens
DEFAULT_CACHE_TOKENS = 32 * DEFAULT_SEQUENCE_TOKENS  # the CPU default budget: the default batch of the longest requests


class ModelRunner:
    def __init__(
        self,
        model: PreTrainedModel,
        context: MixingContext,
        kv_cache_memory: int | float | None = None,
        default_cache_tokens: int = DEFAULT_CACHE_TOKENS,
        prefix_cache: bool = True,
        paged_rows: int | None = None,
    ):
        """kv_cache_memory: the KV cache's budget, bytes or a fraction of free GPU memory (kv_cache.PagedCache);
        prefix_cache: whether sequences with a cache_scope share their cached leading blocks (not for ALiBi models,
        whose 2D padding mask cannot place rows' queries at different offsets); paged_rows: the most rows a decode
        pass has, for decode attention that reads the cache in place (server/engine/paged_attention.py: compiled and
        checked here once the self-check passes, where the model can take it); None: decode passes gather."""
        self.model = model
        self.context = context
        self.device = model.device
        self.dtype = model.dtype
        self.layout = MaskLayout.of(model.config)
        self.prefix_cache = prefix_cache and not self.layout.padding_only
        self.prefix_queried_tokens = 0  # prefilled tokens of sequences whose prefixes are cached
        self.prefix_hit_tokens = 0  # of those, tokens found in the cache
        config = model.config
        self.pad_id = config.pad_token_id if config.pad_token_id is not None else 0
        self.cache = PagedCache.for_model(self._probe, kv_cache_memory, default_cache_tokens, self.dtype, self.device)
        self.rows: list[Sequence] = []
        self._plans: OrderedDict[tuple, BatchPlan] = OrderedDict()
        # A decode pass's attention reads every row's keys up to the longest row's length rounded up to a multiple of
        # this (masked past each row's own): 1 serves; a bench sets more so that the step's shapes repeat
        # (bench.compile_step: what a compiled or graph-captured step gets at best)
        self.decode_length_bucket = 1
        self.paged: PagedAttention | None = None
        self.self_check()
        self.paged = PagedAttention.for_model(model, self.cache, self.layout, paged_rows) if paged_rows else None

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence]) -> torch.Tensor:
        """Takes seqs into the batch, each computing its prompt and the tokens it has (a preempted sequence's), but
        for its leading blocks found in the prefix cache; returns the logits after each one's last token,
        [len(seqs), vocab]. The caller made room in the cache (a MemoryError otherwise); on failure seqs hold no
        blocks."""
        texts = [s.request.prompt_ids + s.tokens for s in seqs]
        lengths = [len(text) for text in texts]
        keys = [self._block_keys(seq, text, len(text) // BLOCK_SIZE) for seq, text in zip(seqs, texts, strict=True)]
        try:
            # every row's cached blocks taken before any block is allocated: an allocation may evict a cached block
            starts = []
            for seq, length, own in zip(seqs, lengths, keys, strict=True):
                self.cache.attach(seq, self.cache.pool.lookup(own[: (length - 1) // BLOCK_SIZE]))  # a token to compute
                starts.append(len(self.cache.pool.tables[seq]) * BLOCK_SIZE)
            for seq, length in zip(seqs, lengths, strict=True):
                self.cache.allocate(seq, length)
            width = max(n - start for n, start in zip(lengths, starts, strict=True))
            ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
            for row, (text, start) in enumerate(zip(texts, starts, strict=True)):
                ids[row, : lengths[row] - start] = torch.tensor(text[start:])
            last = torch.tensor(lengths, device=self.device) - torch.tensor(starts, device=self.device) - 1
            keep, row_of = torch.unique(last, return_inverse=True)
            self.cache.begin_prefill(seqs, starts, lengths, width)
            if any(starts):
                queries = torch.arange(width)[None, :] + torch.tensor(starts)[:, None]
                # padding queries kept within the row's own positions (a model with learnt positions has no more)
                positions = torch.minimum(queries, torch.tensor(lengths)[:, None] - 1).to(self.device)
                mask = self.layout.masks(positions, len(seqs), max(lengths), self.dtype)
            else:
                positions = torch.arange(width, device=self.device)[None]
                mask = self.layout.masks(positions, len(seqs), width, self.dtype)
                positions = positions.expand(len(seqs), width)
            logits = self._forward(seqs, ids.to(self.device), mask, positions, keep, gather=True)
        except BaseException:
            for seq in seqs:
                self.cache.free(seq)
            raise
        for seq, own, length, start in zip(seqs, keys, lengths, starts, strict=True):
            self.cache.pool.register(seq, own)
            if self._shares(seq):
                self.prefix_queried_tokens += length
                self.prefix_hit_tokens += start
        self.rows.extend(seqs)
        return logits[torch.arange(len(seqs), device=self.device), row_of]

    def _block_keys(self, seq: Sequence, text: list[int], blocks: int) -> list[bytes]:
        """The prefix cache's keys of text's first full blocks; none when seq's blocks are not shared."""
        return chain_keys(seq.cache_scope, text, blocks) if self._shares(seq) else []

    def _shares(self, seq: Sequence) -> bool:
        return self.prefix_cache and seq.cache_scope is not None

    def blocks_to_decode(self) -> int:
        """The blocks the next decode pass must take from the pool (rows whose next position starts a block)."""
        return sum(self.cache.pool.missing(s, s.num_tokens) for s in self.rows)

    @torch.inference_mode()
    def decode(self) -> torch.Tensor:
        """One token for every running sequence; logits [len(rows), vocab] in rows order. The caller made room in
        the cache for blocks_to_decode() blocks (a MemoryError otherwise)."""
        rows, new = len(self.rows), []
        try:  # blocks handed out are zeroed with the step's one copy; if the step fails before that, here
            for seq in self.rows:
                new += self.cache.pool.allocate(seq, seq.num_tokens)
            positions = [s.num_tokens - 1 for s in self.rows]
            length = -(-(max(positions) + 1) // self.decode_length_bucket) * self.decode_length_bucket
            positions = torch.tensor(positions)
            write, read = self.cache.decode_slots(self.rows, positions, length)
            ids = torch.tensor([s.tokens[-1] for s in self.rows])
            ids, positions, write, read, zeroed = self._copy_in(
                [ids, positions, write, read, torch.tensor(new, dtype=torch.long)]
            )
            if new:
                self.cache.zero(zeroed)
        except BaseException:
            if new:
                self.cache.zero(torch.tensor(new, device=self.device))
            raise
        if self.paged is not None and self.paged.takes(rows, length):
            try:
                self.cache.begin_decode(write, None, length)  # attention reads the pool in place
                mask = self.paged.masks(read.view(rows, -1), positions)
                return self._forward(self.rows, ids[:, None], mask, positions[:, None], 1)[:, -1]
            except PagedAttentionError as exc:  # then again, gathered
                raise_if_device_fatal(exc.__cause__)
                self.paged.turn_off(str(exc))
        self.cache.begin_decode(write, read, length)
        mask = self.layout.masks(positions[:, None], rows, length, self.dtype)
        return self._forward(self.rows, ids[:, None], mask, positions[:, None], 1)[:, -1]

    def _copy_in(self, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        """The step's host tensors (int64, 1D) on the device in one copy: staged side by side in one buffer and
        split there. On a GPU the buffer is pinned (the copy does not wait), from torch's caching host allocator,
        which hands a buffer out again only once the copy that read it has finished."""
        sizes = [len(part) for part in parts]
        staged = torch.empty(sum(sizes), dtype=torch.long, pin_memory=self.device.type == "cuda")
        torch.cat(parts, out=staged)
        return list(staged.to(self.device, non_blocking=True).split(sizes))

    def release(self, seq: Sequence) -> None:
        """seq leaves the batch, if in it; its blocks return to the pool, the full ones whose keys and values are
        computed (all but the last token's) cached for its prefix."""
        if seq in self.rows:
            self.rows.remove(seq)
        if seq in self.cache.pool.tables:
            text = seq.request.prompt_ids + seq.tokens
            self.cache.pool.register(seq, self._block_keys(seq, text, (len(text) - 1) // BLOCK_SIZE))
        self.cache.free(seq)

    @torch.inference_mode()
    def score(
        self, input_ids: torch.Tensor, combos: list[tuple[int, ...]], weights: list[tuple[float, ...]] | None = None
    ) -> torch.Tensor:
        """Logits of every position, [B, T, vocab], without touching the running batch's cache. combos: each row's
        adapter slots; weights: theirs, slot for slot (None: all 1)."""
        weights = tuple(weights) if weights is not None else None
        with self.context.use(self._plan(tuple(combos), weights, gather=True)):
            return self.model(input_ids=input_ids.to(self.device), use_cache=False).logits

    @torch.inference_mode()
    def self_check(self, decode_steps: int = 4) -> None:
        """Refuses a model that the engine would serve differently from its own forward, and turns the prefix cache
        off for one whose rows cannot start at the positions their cached blocks leave (with a warning).

        Three prompts of different lengths are prefilled together and decoded step by step, one of them released
        halfway, each step compared with the model's own forward; then again for prompts whose first blocks are
        cached, beside one whose are not. A model with sliding windows runs the check with its window shrunk to
        CHECK_WINDOW, which the model and the runner both read from its config, so that short prompts cross it: the
        check covers how windows are applied, for any size.
        """
        config = self.model.config
        window = getattr(config, "sliding_window", None)  # what the model's masks and MaskLayout both read
        shrink = window is not None and window > CHECK_WINDOW
        if shrink:
            config.sliding_window = CHECK_WINDOW
            self.layout = MaskLayout.of(config)
        cache, self.cache = self.cache, self.cache.sibling(8)  # whatever the budget; the real pool left untouched
        length, vocab = CHECK_WINDOW + 6 if window else 12, config.vocab_size
        prefix_worst: float | Exception = 0.0
        try:
            try:
                worst = self._compare_with_own_forward(
                    [PromptSequence(_check_prompt(n, n, vocab)) for n in (length, length - 3, length - 6)], decode_steps
                )
            except Exception as exc:
                raise UnsupportedModel(f"{config.model_type}: the engine cannot run this model: {exc!r}") from exc
            if self.prefix_cache:
                try:
                    prefix_worst = self._compare_with_cached_prefixes(length, vocab, decode_steps)
                except Exception as exc:
                    prefix_worst = exc
        finally:
            self.cache = cache
            self.prefix_queried_tokens = self.prefix_hit_tokens = 0
            if shrink:
                config.sliding_window = window
                self.layout = MaskLayout.of(config)
        tolerance = 1e-4 if self.dtype == torch.float32 else 5e-2
        if not worst <= tolerance:
            raise UnsupportedModel(
                f"{config.model_type}: the engine's batched prefill and decode disagree with the model's own forward"
                f" (relative difference {worst:.2g}, tolerance {tolerance:g}); this model's attention layout is not"
                " supported"
            )
        if isinstance(prefix_worst, Exception) or not prefix_worst <= tolerance:
            self.prefix_cache = False
            log.warning(
                "%s: the prefix cache is off: rows prefilled after their cached blocks disagree with the model's own"
                " forward (%s)",
                config.model_type,
                repr(prefix_worst)
                if isinstance(prefix_worst, Exception)
                else f"relative difference {prefix_worst:.2g}",
            )
        log.info("self-check passed on a %s base: worst relative difference %.2g", quantization_of(self.model), worst)

    def _compare_with_cached_prefixes(self, length: int, vocab: int, decode_steps: int) -> float:
        """A prompt's blocks cached, then prompts that start with two of them, with one of them, and with none."""
        scope, shared = b"self-check", _check_prompt(2 * BLOCK_SIZE + 3, 1, vocab)
        first = PromptSequence(shared, cache_scope=scope)
        self.prefill([first])
        self.release(first)
        probes = [
            PromptSequence(shared[: 2 * BLOCK_SIZE] + _check_prompt(5, 2, vocab), cache_scope=scope),
            PromptSequence(_check_prompt(length, 3, vocab), cache_scope=scope),
            PromptSequence(shared[: BLOCK_SIZE + 4], cache_scope=scope),
        ]
        worst = self._compare_with_own_forward(probes, decode_steps)
        if self.prefix_hit_tokens != 3 * BLOCK_SIZE:
            raise AssertionError(f"{self.prefix_hit_tokens} tokens found cached, not {3 * BLOCK_SIZE}")
        return worst

    def _compare_with_own_forward(self, probes: list[PromptSequence], decode_steps: int) -> float:
        worst = 0.0
        logits = self.prefill(probes)
        try:
            for step in range(decode_steps + 1):
                for probe, row in zip(self.rows, logits, strict=True):
                    ids = torch.tensor([probe.request.prompt_ids + probe.tokens], device=self.device)
                    expected = self.model(input_ids=ids, use_cache=False).logits[0, -1]
                    scale = float(expected.abs().max()) + 1.0
                    worst = max(worst, float((row - expected).abs().max()) / scale)
                    probe.tokens.append(int(expected.argmax()))
                if step == 1:
                    self.release(probes[0])  # the others read their own blocks as before
                if step < decode_steps:
                    logits = self.decode()
        finally:
            for probe in probes:
                if probe in self.rows:
                    self.release(probe)
        return worst

    def _probe(self, cache) -> None:
        """One token through the model, into `cache` (PagedCache learns the shapes the layers store)."""
        positions = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        mask = self.layout.masks(positions, 1, 1, self.dtype)
        ids = torch.full((1, 1), self.pad_id, dtype=torch.long, device=self.device)
        with torch.inference_mode():
            self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)

    def _forward(self, seqs, ids, mask, positions, keep, gather: bool = False) -> torch.Tensor:
        with self.context.use(self._plan(tuple(s.slots for s in seqs), tuple(s.weights for s in seqs), gather)):
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                cache=self.cache,
                use_cache=True,
                logits_to_keep=keep,
            )
        return out.logits

    def _plan(self, combos: tuple[tuple[int, ...], ...], weights, gather: bool = False) -> BatchPlan:
        """The same plan object while the batch keeps its composition, so that layers reuse their preparation."""
        if weights is not None and all(w == 1 for row in weights for w in row):
            weights = None  # the common case, one plan for it
        key = (combos, weights, gather)
        plan = self._plans.pop(key, None) or BatchPlan(combos, self.device, gather, weights)
        self._plans[key] = plan
        while len(self._plans) > 8:
            self._plans.popitem(last=False)
        return plan


def _check_prompt(length: int, salt: int, vocab: int) -> list[int]:
    return [(7 * i + 11 + salt) % vocab for i in range(length)]


class PromptSequence:
    """What the runner reads of a Sequence, without a request around it (the self-check's, and tests')."""

    def __init__(self, prompt_ids: list[int], slots: tuple[int, ...] = (), cache_scope: bytes | None = None):
        self.request = SimpleNamespace(prompt_ids=prompt_ids)
        self.slots = slots
        self.weights = (1.0,) * len(slots)
        self.tokens: list[int] = []
        self.cache_scope = cache_scope

    @property
    def num_tokens(self) -> int:
        return len(self.request.prompt_ids) + len(self.tokens)
