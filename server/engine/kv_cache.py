"""Keys and values of the running sequences, in fixed-size blocks from one pool sized by a memory budget.

Each sequence holds a block table: its token at position p sits in block `table[p // BLOCK_SIZE]`, at offset
`p % BLOCK_SIZE`. A block is handed out zeroed and returns to the pool when its sequence leaves the batch
(finished, cancelled, failed or preempted), unless it is a full block cached for its prefix: then it stays, free but
reusable by a later sequence of the same scope (tenant, adapters, their versions and weights) and leading tokens,
until the pool needs it for another (BlockPool). Block 0 is never handed out: it stays zero and pads the tables of
shorter rows.

The model's attention calls `update`, which writes this pass's keys and values into the rows' blocks and returns
what attention reads, `[rows, kv_heads, length, head_dim]`: in a prefill where every row starts at position 0 the
pass's own keys and values; otherwise (a decode, or a prefill of rows whose first blocks are cached) each row's own
blocks gathered up to `length` (the longest row's), where a shorter row's positions past its own length read
zeros, hidden by the runner's mask. Masks hide keys by adding -inf, which
cannot hide a NaN: hence zeroed blocks, never an earlier occupant's values (an overflowing adapter may leave NaN).

Each layer's pool takes the shape the model's attention stores (one shared head for multi-query Falcon, other
head sizes per layer), learnt from one probe pass when the cache is built.
"""

from __future__ import annotations

import array
import hashlib
import heapq
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

BLOCK_SIZE = 16  # tokens per block
GPU_DEFAULT_FRACTION = 0.5  # of the device memory free once the model is loaded (adapters need the rest)
CPU_DEFAULT_SHARE = 0.25  # the default budget on CPU never exceeds this share of the machine's memory


def blocks_for(tokens: int) -> int:
    return -(-tokens // BLOCK_SIZE)


class BlockPool:
    """Which blocks are free, which each sequence holds, and which hold a cached prefix.

    A full block whose keys and values are computed can be cached under its chain key (`chain_keys`): a later
    sequence whose text starts with the same blocks, in the same scope, takes it into its table instead of computing
    it again. A block may be in several tables (refs counts them); it is never written once full. A cached block no
    table holds is still free: it waits in least-recently-released order and is evicted (its key forgotten) when the
    free heap is empty. Free blocks are handed out lowest first, so that the pages a CPU touches stay few (an
    untouched block of the pool costs no resident memory)."""

    def __init__(self, blocks: int):
        self.total = blocks
        self._free = list(range(1, blocks + 1))  # a heap; block 0 is the zero block
        self.tables: dict[object, list[int]] = {}
        self._refs: dict[int, int] = {}  # block -> tables holding it
        self._cached: dict[bytes, int] = {}  # chain key -> block
        self._key_of: dict[int, bytes] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks no table holds, oldest first

    @property
    def free(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def used(self) -> int:
        return self.total - self.free

    @property
    def cached(self) -> int:
        return len(self._cached)

    def missing(self, seq, tokens: int) -> int:
        """Blocks seq lacks to hold `tokens` tokens."""
        return max(0, blocks_for(tokens) - len(self.tables.get(seq, ())))

    def lookup(self, keys: Sequence[bytes]) -> list[int]:
        """The cached blocks of the longest run of leading keys."""
        blocks = []
        for key in keys:
            block = self._cached.get(key)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def attach(self, seq, blocks: list[int]) -> None:
        """seq, holding no block yet, starts its table with these cached blocks."""
        assert seq not in self.tables
        self.tables[seq] = list(blocks)
        for block in blocks:
            self._refs[block] = self._refs.get(block, 0) + 1
            self._evictable.pop(block, None)

    def allocate(self, seq, tokens: int) -> list[int]:
        """Extends seq's table to hold `tokens` tokens; returns the new blocks (evicted cached blocks among them).
        Raises MemoryError when the pool is short (the engine makes room before it asks)."""
        need = self.missing(seq, tokens)
        if need > self.free:
            raise MemoryError(f"KV cache: {need} blocks needed, {self.free} free")
        new = [self._take() for _ in range(need)]
        self.tables.setdefault(seq, []).extend(new)
        for block in new:
            self._refs[block] = 1
        return new

    def _take(self) -> int:
        if self._free:
            return heapq.heappop(self._free)
        block, _ = self._evictable.popitem(last=False)
        del self._cached[self._key_of.pop(block)]
        return block

    def register(self, seq, keys: Sequence[bytes]) -> None:
        """seq's first len(keys) blocks, full and computed, become cached under these keys (a block already cached,
        or a key another block holds, stays as it is)."""
        for block, key in zip(self.tables.get(seq, ()), keys):
            if block not in self._key_of and key not in self._cached:
                self._cached[key], self._key_of[block] = block, key

    def deallocate(self, seq) -> None:
        # the table's last blocks first into the eviction order: a chain is looked up from its first block, so its
        # tail is the least useful without it
        for block in reversed(self.tables.pop(seq, ())):
            self._refs[block] -= 1
            if self._refs[block]:
                continue
            del self._refs[block]
            if block in self._key_of:
                self._evictable[block] = None
            else:
                heapq.heappush(self._free, block)


def chain_keys(scope: bytes, tokens: Sequence[int], blocks: int) -> list[bytes]:
    """The keys of the first `blocks` full blocks of tokens: each a SHA-256 of the one before it (the scope's digest
    before the first) and of its own tokens, so that a key names the whole prefix up to its block. Cryptographic:
    two prefixes under one key would hand one request another's keys and values."""
    keys, parent = [], hashlib.sha256(scope).digest()
    for i in range(blocks):
        chunk = array.array("q", tokens[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE]).tobytes()
        parent = hashlib.sha256(parent + chunk).digest()
        keys.append(parent)
    return keys


class PagedCache:
    """The pool's tensors, one per layer for keys and one for values: [blocks + 1, BLOCK_SIZE, heads, head_dim]."""

    def __init__(self, shapes: dict[int, tuple[torch.Size, torch.Size]], blocks: int, dtype, device):
        """shapes: per layer, the [heads, head_dim] of its keys and of its values."""
        self.shapes, self.dtype = shapes, dtype
        self.pool = BlockPool(blocks)
        self.keys = {i: _storage(blocks, k, dtype, device) for i, (k, _) in shapes.items()}
        self.values = {i: _storage(blocks, v, dtype, device) for i, (_, v) in shapes.items()}
        self.device = device
        self.block_bytes = sum(t[0].numel() * t.element_size() for t in (*self.keys.values(), *self.values.values()))
        self._write: torch.Tensor | None = None  # [tokens written] flat slots of this pass
        self._written: torch.Tensor | None = None  # prefill: [rows, width] which positions are a row's own
        self._read: torch.Tensor | None = None  # decode: [rows * blocks] the blocks each row reads, in order
        self._length = 0
        self._query_length = 0

    @classmethod
    def for_model(cls, forward: Callable, budget: int | float | None, default_tokens: int, dtype, device):
        """A cache for the model that `forward(cache)` runs one token through; budget: bytes, a fraction of free
        device memory (GPU), or None for the default (GPU: GPU_DEFAULT_FRACTION of free memory; CPU: room for
        default_tokens tokens, within CPU_DEFAULT_SHARE of the machine's memory)."""
        probe = _ShapeProbe()
        forward(probe)
        token_bytes = sum(k.numel() + v.numel() for k, v in probe.shapes.values()) * dtype.itemsize
        blocks = _budget(budget, default_tokens * token_bytes, device) // (BLOCK_SIZE * token_bytes)
        if blocks < 1:
            raise ValueError(
                f"MIXSERVE_KV_CACHE_MEMORY holds no block of {BLOCK_SIZE} tokens ({BLOCK_SIZE * token_bytes} bytes)"
            )
        return cls(probe.shapes, int(blocks), dtype, device)

    def sibling(self, blocks: int) -> PagedCache:
        """Another cache of `blocks` blocks for the same model."""
        return PagedCache(self.shapes, blocks, self.dtype, self.device)

    @property
    def capacity_tokens(self) -> int:
        return self.pool.total * BLOCK_SIZE

    def attach(self, seq, blocks: list[int]) -> None:
        """seq's table starts with these cached blocks (BlockPool.lookup)."""
        self.pool.attach(seq, blocks)

    def allocate(self, seq, tokens: int) -> None:
        """seq's table extended to hold `tokens` tokens, its new blocks zeroed (an evicted one too)."""
        new = self.pool.allocate(seq, tokens)
        if new:
            self.zero(torch.tensor(new, device=self.device))

    def zero(self, blocks: torch.Tensor) -> None:
        """Zeroes these blocks (on the device) of every layer."""
        for layer in (*self.keys.values(), *self.values.values()):
            layer.index_fill_(0, blocks, 0)

    def free(self, seq) -> None:
        self.pool.deallocate(seq)

    def begin_prefill(self, seqs: Sequence, starts: list[int], lengths: list[int], width: int) -> None:
        """The next pass computes row r's positions starts[r]..lengths[r]-1 (its first lengths[r] - starts[r] of
        `width` queries; the rest is padding, never stored). Rows from position 0 attend to this pass's own keys;
        when a row starts later (its first blocks cached), every row reads its blocks gathered."""
        queries = torch.arange(width)
        own = queries[None, :] < torch.tensor([n - s for s, n in zip(starts, lengths, strict=True)])[:, None]
        slots = self._slots(seqs, torch.tensor(starts)[:, None] + queries[None, :])  # [rows, width]
        self._write = slots[own].to(self.device)
        self._written = own.to(self.device)
        self._query_length = width
        if not any(starts):
            self._read, self._length = None, width
            return
        self._length = max(lengths)
        self._read = self._table(seqs, blocks_for(self._length)).flatten().to(self.device)

    def decode_slots(self, seqs: Sequence, positions: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """On the host, for a decode pass writing each row's token at positions [rows] and reading its positions
        0..length-1: (the flat slots written [rows], the blocks read [rows * blocks], each row's in order: whole blocks
        are gathered, a copy of contiguous blocks, several times faster than one of tokens)."""
        table = self._table(seqs, blocks_for(length))  # [rows, blocks]
        write = table[torch.arange(len(seqs)), positions // BLOCK_SIZE] * BLOCK_SIZE + positions % BLOCK_SIZE
        return write, table.flatten()

    def begin_decode(self, write: torch.Tensor, read: torch.Tensor | None, length: int) -> None:
        """The next pass writes one token per row at the flat slots `write` and reads the blocks `read`, up to
        length, of every row (decode_slots's, on the device); read None: attention reads the pool in place
        (paged_attention.py), and update returns the pass's own keys and values."""
        self._write, self._read = write, read
        self._written, self._length, self._query_length = None, length, 1

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        # key, value: [rows, kv_heads, tokens, head_dim]
        keys, values = self.keys[layer_idx].flatten(0, 1), self.values[layer_idx].flatten(0, 1)  # [slots, heads, dim]
        if self._written is None:  # decode: one token per row (index_put_: torch.compile traces it, not index_copy_)
            keys.index_put_((self._write,), key[:, :, 0])
            values.index_put_((self._write,), value[:, :, 0])
        else:
            keys.index_copy_(0, self._write, key.transpose(1, 2)[self._written])
            values.index_copy_(0, self._write, value.transpose(1, 2)[self._written])
        if self._read is None:  # prefill from position 0: attention reads this pass's own keys
            return key, value
        return self._gather(self.keys[layer_idx], key.shape[0]), self._gather(self.values[layer_idx], key.shape[0])

    def _gather(self, pool: torch.Tensor, rows: int) -> torch.Tensor:
        """[rows, heads, length, dim]: each row's blocks in order, up to the pass's length."""
        blocks = pool.index_select(0, self._read)  # [rows * blocks, BLOCK_SIZE, heads, dim]
        return blocks.view(rows, -1, *pool.shape[2:])[:, : self._length].transpose(1, 2)

    def _slots(self, seqs: Sequence, positions: torch.Tensor) -> torch.Tensor:
        """[rows, P] flat slot of each row's positions [rows, P]; past a row's blocks: the zero block."""
        table = self._table(seqs, int(positions.max()) // BLOCK_SIZE + 1)
        return table.gather(1, positions // BLOCK_SIZE) * BLOCK_SIZE + positions % BLOCK_SIZE

    def _table(self, seqs: Sequence, width: int) -> torch.Tensor:
        """[rows, width] each row's first blocks, padded with the zero block."""
        tables = [self.pool.tables.get(seq, [])[:width] for seq in seqs]
        return torch.tensor([blocks + [0] * (width - len(blocks)) for blocks in tables], dtype=torch.long)

    # What transformers asks of a cache while it builds masks and positions for models that build their own
    # (ALiBi models get a 2D padding mask): every row's keys span 0..length-1, the queries end at length-1.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._length - self._query_length

    def get_mask_sizes(self, query_length, layer_idx: int = 0) -> tuple[int, int]:
        return self._length, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.get_seq_length(layer_idx)

    @property
    def is_compileable(self) -> bool:
        return False


class _ShapeProbe:
    """A cache for one token's pass that records the shape each layer stores."""

    def __init__(self) -> None:
        self.shapes: dict[int, tuple[torch.Size, torch.Size]] = {}

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.shapes[layer_idx] = (
            torch.Size((key.shape[1], key.shape[3])),
            torch.Size((value.shape[1], value.shape[3])),
        )
        return key, value

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def get_mask_sizes(self, query_length, layer_idx: int = 0) -> tuple[int, int]:
        return 1, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return 0

    @property
    def is_compileable(self) -> bool:
        return False


def _storage(blocks: int, shape: torch.Size, dtype, device) -> torch.Tensor:
    """Uninitialised (on CPU, pages untouched until a block is first handed out), but for the zero block."""
    storage = torch.empty(blocks + 1, BLOCK_SIZE, *shape, dtype=dtype, device=device)
    storage[0] = 0
    return storage


def _budget(budget: int | float | None, default_bytes: int, device: torch.device) -> int:
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        if budget is None or isinstance(budget, float):
            return int(free * (GPU_DEFAULT_FRACTION if budget is None else budget))
        return budget
    if isinstance(budget, float):
        raise ValueError("MIXSERVE_KV_CACHE_MEMORY as a fraction is for GPUs; on CPU give bytes (e.g. 2GB)")
    if budget is not None:
        return budget
    machine = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return min(default_bytes, int(machine * CPU_DEFAULT_SHARE))
