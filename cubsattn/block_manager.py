"""Block allocator for the paged KV cache: per-sequence block tables, slot mappings, fork with copy-on-write.

Plain NumPy bookkeeping on the host. Sequences are identified by integer handles (rows of persistent per-handle
arrays), so a whole batch is processed with a handful of vectorised NumPy operations, not one Python iteration per
sequence. A decode step (:meth:`BlockAllocator.append_decode`) is the hot path of a serving loop: it skips the
copy-on-write planning while no block is shared, reuses the validation of the previous step's handles while no
sequence was added or freed (a list equal to the previous step's is not even converted to an array), reads whole
table rows as one slice when the handles are consecutive, and adds each sequence's offset in its last block to the
first slot of that block, kept per sequence, instead of looking the block up in the table.

One step of a serving loop::

    alloc = BlockAllocator(num_blocks, block_size)
    a, b = alloc.add_sequence(), alloc.add_sequence()
    slots, cow = alloc.append_tokens([a, b], [prompt_len_a, prompt_len_b])   # prefill (or a prefill chunk)
    copy_blocks(kv_caches, cow)            # copy-on-write first (empty unless a forked block was shared)
    write_to_paged_cache(key, value, key_cache, value_cache, slots)
    tables = alloc.block_tables([a, b])    # int32 [2, max_blocks], 0-padded
    c = alloc.fork(a)                      # c shares a's blocks (beam search, parallel sampling)
    slots, cow = alloc.append_tokens([a, b, c], 1)                            # a decode step
    alloc.free([a, b, c])

Invariants: a block is either on the free list (reference count 0) or referenced by exactly ``ref_counts()[blk]``
sequence tables; a sequence of ``n`` tokens holds exactly ``ceil(n / block_size)`` blocks; only the last, partially
filled block of a sequence can need a copy before a write. An operation that cannot get enough blocks raises
:class:`OutOfBlocksError` before changing anything.
"""

from __future__ import annotations

import numpy as np

from ._checks import check_int

__all__ = ["BlockAllocator", "OutOfBlocksError"]


_NO_COW = np.empty((0, 2), dtype=np.int64)
_NO_COW.flags.writeable = False


def _is_one(n) -> bool:
    """``num_new_tokens`` is the plain int 1 (a decode step)."""
    return type(n) is int and n == 1


class OutOfBlocksError(RuntimeError):
    """Not enough free cache blocks; raised before any state changed (free or preempt sequences, then retry)."""


class BlockAllocator:
    """Allocates cache blocks to sequences; builds block tables and slot mappings.

    Parameters
    ----------
    num_blocks : int
        Blocks in the cache (``kv_cache.shape[1]``); ids ``0 .. num_blocks - 1``.
    block_size : int
        Token slots per block; token position ``p`` of a sequence lives in slot
        ``table[p // block_size] * block_size + p % block_size``.

    Notes
    -----
    Handles are small integers reused after :meth:`free`; a freed handle must not be used again.
    """

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = check_int("num_blocks", num_blocks, minimum=1)
        self.block_size = check_int("block_size", block_size, minimum=1)
        self._pow2 = self.block_size & (self.block_size - 1) == 0  # offsets in a block by a mask, not a division
        # Free list as a stack: entries [0, _num_free) are free ids; popping from the top hands out low ids first.
        self._free = np.arange(self.num_blocks - 1, -1, -1, dtype=np.int64)
        self._num_free = self.num_blocks
        self._refs = np.zeros(self.num_blocks, dtype=np.int32)
        # Per-handle rows, grown by doubling. Table entries past a sequence's block count are 0 (the padding).
        self._tables = np.zeros((16, 16), dtype=np.int32)
        self._lens = np.zeros(16, dtype=np.int64)
        self._nblocks = np.zeros(16, dtype=np.int64)
        # First slot of each sequence's last block (table[row, nblocks - 1] * block_size), for rows holding blocks:
        # a decode step's slot is this plus the length modulo block_size unless the last block is full.
        self._base = np.zeros(16, dtype=np.int64)
        self._alive = np.zeros(16, dtype=bool)
        self._mark = np.zeros(16, dtype=np.int64)  # scratch for duplicate-handle detection
        self._spare_rows: list[int] = []
        self._next_row = 0
        # Bumped whenever the set of live handles changes: a validated handle batch stays valid until then.
        self._version = 0
        # (version, rows, slice of rows when consecutive or None, a copy of the handles when they came as a list or
        # None, the rows' bytes) of the last validated batch.
        self._validated = None
        # False only while no block has more than one holder (no fork since the last check): decode steps then need
        # no copy-on-write planning.
        self._maybe_shared = False

    # -----------------------------------------------------------------------------------------------------------
    # Queries

    @property
    def num_free_blocks(self) -> int:
        return self._num_free

    def free_block_ids(self) -> np.ndarray:
        """int64 ``[num_free_blocks]``: the free list (a copy)."""
        return self._free[: self._num_free].copy()

    def ref_counts(self) -> np.ndarray:
        """int32 ``[num_blocks]``: how many sequence tables hold each block (a copy)."""
        return self._refs.copy()

    def seq_lens(self, handles) -> np.ndarray:
        """int32 ``[B]``: tokens stored for each sequence."""
        return self._lens[self._rows(handles)].astype(np.int32)

    def block_tables(self, handles, *, width: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """int32 ``[B, width]``: each sequence's block ids in order, 0-padded.

        ``width`` defaults to the largest block count in the batch (at least 1); a smaller width is an error.
        ``out``, optional: an int32 ``[B, width]`` array to fill (e.g. a staging buffer) instead of a new one.
        """
        return self._tables_of(self._rows(handles), width, out)

    def _tables_of(self, rows, width, out=None):
        need = int(self._nblocks[rows].max(initial=0))
        if width is None:
            width = max(need, 1)
        width = check_int("width", width, minimum=0)
        if width < need:
            raise ValueError(f"width ({width}) must be >= the largest block count in the batch ({need})")
        if out is None:
            out = np.empty((rows.size, width), dtype=np.int32)
        elif not isinstance(out, np.ndarray) or out.dtype != np.int32 or out.shape != (rows.size, width):
            raise ValueError(f"out must be an int32 NumPy array of shape [{rows.size}, {width}], got "
                             f"{type(out).__name__} {getattr(out, 'dtype', '')} {list(getattr(out, 'shape', ()))}")
        cols = min(width, self._tables.shape[1])
        span = self._span(rows)
        # Consecutive handles (the usual batch) read their rows as one slice instead of a gather.
        out[:, :cols] = self._tables[span, :cols] if span is not None else self._tables[rows, :cols]
        out[:, cols:] = 0
        return out

    def blocks_needed(self, handles, num_new_tokens) -> int:
        """Free blocks :meth:`append_tokens` would take for the same arguments (new blocks + copy-on-write)."""
        rows, counts = self._rows(handles), self._counts(handles, num_new_tokens)
        _, grow, cow, _ = self._plan(rows, counts)
        return int(grow.sum() + cow.sum())

    # -----------------------------------------------------------------------------------------------------------
    # Sequences

    def add_sequence(self) -> int:
        """A new empty sequence; returns its handle."""
        row = self._new_row()
        self._alive[row] = True
        self._version += 1
        return row

    def fork(self, handle) -> int:
        """A new sequence sharing all blocks (and the length) of ``handle``; returns its handle.

        Shared blocks are copied lazily: the first write into a shared, partially filled last block gets a private
        copy through the ``cow`` pairs of :meth:`append_tokens`.
        """
        parent = int(self._rows(handle)[0])
        child = self._new_row()
        n = int(self._nblocks[parent])
        self._tables[child, :n] = self._tables[parent, :n]
        self._refs[self._tables[parent, :n]] += 1  # a table never holds a block twice
        self._lens[child], self._nblocks[child], self._alive[child] = self._lens[parent], n, True
        self._base[child] = self._base[parent]
        self._maybe_shared = self._maybe_shared or n > 0
        self._version += 1
        return child

    def free(self, handles) -> None:
        """Release sequences; blocks nobody references any more return to the free list."""
        rows = self._rows(handles)
        counts = self._nblocks[rows]
        width = int(counts.max(initial=0))
        blocks = self._tables[rows, :width][np.arange(width) < counts[:, None]]
        np.subtract.at(self._refs, blocks, 1)
        released = np.unique(blocks[self._refs[blocks] == 0])
        self._push(released)
        self._tables[rows] = 0
        self._lens[rows] = 0
        self._nblocks[rows] = 0
        self._alive[rows] = False
        self._spare_rows.extend(rows.tolist())
        self._version += 1
        if self._maybe_shared:
            self._maybe_shared = bool((self._refs > 1).any())

    def append_tokens(self, handles, num_new_tokens):
        """Reserve slots for the next ``num_new_tokens`` positions of each sequence.

        Covers prefill (the whole prompt), chunked prefill (positions ``[context_len, context_len + chunk)``) and
        decode (1 each).

        Parameters
        ----------
        handles : int or integer ``[B]``, distinct live sequences.
        num_new_tokens : int or integer ``[B]`` >= 0.

        Returns
        -------
        slot_mapping : int64 ``[sum(num_new_tokens)]``: slots of the new positions, sequence by sequence, in order.
        cow : int64 ``[K, 2]``: (src, dst) block pairs to copy with ``copy_blocks`` *before* writing the new tokens
            (a shared, partially filled last block gets a private copy). Destinations are fresh blocks.

        Raises
        ------
        OutOfBlocksError
            Fewer free blocks than needed; nothing changed.
        """
        rows = self._rows(handles)
        if _is_one(num_new_tokens):
            _, _, slots, cow, _, _ = self._append_ones(rows)
            return slots, cow
        return self._append(rows, self._counts(handles, num_new_tokens))

    def append_decode(self, handles, *, width: int | None = None):
        """A decode step: one new token for each sequence (``append_tokens(handles, 1)``, and what its metadata needs).

        Parameters
        ----------
        handles : int or integer ``[B]``, distinct live sequences.
        width : int, optional
            Block-table width; default the largest block count after the append (at least 1). A smaller width
            raises before anything changes.

        Returns
        -------
        context_lens : int64 ``[B]``: tokens stored before this step (the new token's position).
        slot_mapping : int64 ``[B]``: the new tokens' slots.
        cow : int64 ``[K, 2]``: as :meth:`append_tokens` (empty unless a forked, shared block is written).
        block_tables : int32 ``[B, width]``, read-only and valid only until the allocator's next call: a view of the
            allocator's own rows where it can be (consecutive handles), so that copying it once into a staging buffer
            is the step's only table copy. Copy it to keep it.

        Raises
        ------
        OutOfBlocksError, ValueError
            Nothing changed.
        """
        context, _, slots, cow, tables, _ = self._decode_step(handles, width)
        return context, slots, cow, tables

    def _decode_step(self, handles, width):
        """:meth:`append_decode`, plus the lengths after the append (int64 ``[B]``, a new array) second and the
        largest of them (int) last."""
        rows = self._rows(handles)
        context, lens, slots, cow, width, longest = self._append_ones(rows, width)
        span = self._span(rows)
        if width <= self._tables.shape[1]:
            tables = self._tables[span if span is not None else rows, :width]
        else:
            tables = self._tables_of(rows, width)
        tables.flags.writeable = False
        return context, lens, slots, cow, tables, longest

    def append_step(self, handles, num_new_tokens, *, width: int | None = None):
        """:meth:`append_tokens`, plus what a step's metadata needs, validating the handles once.

        Returns
        -------
        context_lens : int64 ``[B]``: tokens stored before this append.
        slot_mapping, cow : as :meth:`append_tokens`.
        block_tables : int32 ``[B, width]`` after the append (see :meth:`block_tables`).
        """
        rows = self._rows(handles)
        if _is_one(num_new_tokens):
            context, _, slots, cow, _, _ = self._append_ones(rows, width)
        else:
            counts = self._counts(handles, num_new_tokens)
            context = self._lens[rows].copy()
            slots, cow = self._append(rows, counts)
        return context, slots, cow, self._tables_of(rows, width)

    def _append_ones(self, rows, width=None):
        """(context lens, lens after, slots, cow, table width, largest length after) of appending one token to each
        row, the width checked (or chosen: the largest block count, at least 1) first; the copy-on-write plan only
        when a block may be shared."""
        bs = self.block_size
        if self._maybe_shared:
            context = self._lens[rows].copy()
            longest = int(context.max(initial=-1)) + 1
            width = self._check_width(width, (longest + bs - 1) // bs)
            slots, cow = self._append(rows, np.ones(rows.size, dtype=np.int64))
            return context, context + 1, slots, cow, width, longest
        span = self._span(rows)
        at = rows if span is None else span
        context = self._lens[at]
        if span is not None:
            context = context.copy()
        off = context & (bs - 1) if self._pow2 else context % bs
        # A sequence holds ceil(lens / bs) blocks: the new token opens a block exactly when the last one is full.
        need = off.size - np.count_nonzero(off)
        longest = int(context.max(initial=-1)) + 1
        width = self._check_width(width, (longest + bs - 1) // bs)
        if need > self._num_free:
            raise OutOfBlocksError(f"need {need} free blocks ({need} new, 0 copy-on-write) but only "
                                   f"{self._num_free} of {self.num_blocks} are free")
        if need:
            full = off == 0
            grow_rows, cols = rows[full], context[full] // bs
            if int(cols.max()) >= self._tables.shape[1]:
                self._grow_columns(int(cols.max()) + 1)
            fresh = self._pop(need)
            self._refs[fresh] = 1
            self._tables[grow_rows, cols] = fresh
            self._nblocks[grow_rows] = cols + 1
            self._base[grow_rows] = fresh * bs
        lens = context + 1
        self._lens[at] = lens
        return context, lens, self._base[at] + off, _NO_COW, width, longest

    @staticmethod
    def _check_width(width, need: int) -> int:
        """``width`` (default ``max(need, 1)``), at least ``need``."""
        if width is None:
            return max(need, 1)
        width = check_int("width", width, minimum=0)
        if width < need:
            raise ValueError(f"width ({width}) must be >= the largest block count in the batch ({need})")
        return width

    def _append(self, rows, counts):
        lens = self._lens[rows]
        new_nblocks, grow, cow, last = self._plan(rows, counts)
        num_cow = int(cow.sum())
        need = int(grow.sum()) + num_cow
        if need > self._num_free:
            raise OutOfBlocksError(f"need {need} free blocks ({need - num_cow} new, {num_cow} copy-on-write) but only "
                                   f"{self._num_free} of {self.num_blocks} are free")
        if new_nblocks.size and int(new_nblocks.max()) > self._tables.shape[1]:
            self._grow_columns(int(new_nblocks.max()))
        fresh = self._pop(need)
        self._refs[fresh] = 1
        cow_pairs = np.empty((num_cow, 2), dtype=np.int64)
        if num_cow:
            cow_rows = rows[cow]
            cow_pairs[:, 0], cow_pairs[:, 1] = last[cow], fresh[:num_cow]
            np.subtract.at(self._refs, last[cow], 1)
            self._tables[cow_rows, self._nblocks[cow_rows] - 1] = fresh[:num_cow]
        if need > num_cow:
            grow_rows = np.repeat(rows, grow)
            # Column of each new block: the sequence's old block count + its index among that sequence's new blocks.
            starts = np.cumsum(grow) - grow
            cols = np.repeat(self._nblocks[rows] - starts, grow) + np.arange(need - num_cow)
            self._tables[grow_rows, cols] = fresh[num_cow:]
        self._lens[rows] = lens + counts
        self._nblocks[rows] = new_nblocks
        self._base[rows] = self._tables[rows, np.maximum(new_nblocks - 1, 0)].astype(np.int64) * self.block_size
        total = int(counts.sum())
        if total == rows.size and (counts == 1).all():  # decode: one token per sequence
            token_rows, pos = rows, lens
        else:
            token_rows = np.repeat(rows, counts)
            pos = np.repeat(lens - (np.cumsum(counts) - counts), counts) + np.arange(total)
        bs = self.block_size
        slots = self._tables[token_rows, pos // bs].astype(np.int64) * bs + pos % bs
        return slots, cow_pairs

    # -----------------------------------------------------------------------------------------------------------
    # Internals

    def _plan(self, rows, counts):
        """(new block counts, blocks to add per row, copy-on-write mask, last block per row) for an append."""
        lens, nblocks = self._lens[rows], self._nblocks[rows]
        new_nblocks = np.maximum(nblocks, -(-(lens + counts) // self.block_size))
        grow = new_nblocks - nblocks
        last = self._tables[rows, np.maximum(nblocks - 1, 0)].astype(np.int64)
        # Writing into a partially filled last block that another table also holds needs a private copy.
        cow = (lens % self.block_size != 0) & (counts > 0) & (self._refs[last] > 1)
        if cow.any():
            # When every holder of a shared block appends in this batch, one of them may keep it in place.
            idx = np.flatnonzero(cow)
            blocks, first, n = np.unique(last[idx], return_index=True, return_counts=True)
            cow[idx[first[self._refs[blocks] == n]]] = False
        return new_nblocks, grow, cow, last

    def _rows(self, handles) -> np.ndarray:
        """Validated int64 rows of ``handles`` (live, distinct); do not modify the result."""
        last = self._validated
        # The batch of the previous step again, as an equal list (the usual case), with no sequence added or freed
        # since: already known live and distinct, and no list-to-array conversion.
        if type(handles) is list and last is not None and last[0] == self._version and handles == last[3]:
            return last[1]
        rows = np.asarray(handles)
        if rows.ndim > 1 or rows.dtype.kind not in "iu":
            raise TypeError(f"handles must be an int or a 1-D integer array, got {rows.dtype} shape {rows.shape}")
        rows = rows.astype(np.int64, copy=False).reshape(-1)
        if rows.size == 0:
            return rows
        # The same for an array (or anything else NumPy converts), compared as bytes.
        if last is not None and last[0] == self._version and last[4] == rows.tobytes():
            return last[1]
        if rows.min() < 0 or rows.max() >= self._alive.size or not self._alive[rows].all():
            bad = [int(r) for r in rows if not (0 <= r < self._alive.size and self._alive[r])]
            raise ValueError(f"handle {bad[0]} is not a live sequence")
        order = np.arange(rows.size)
        self._mark[rows] = order
        if (self._mark[rows] != order).any():
            raise ValueError(f"handles must be distinct, got {rows.tolist()}")
        rows = rows.copy()  # the cached copy below must not change when the caller's array does
        span = (slice(int(rows[0]), int(rows[0]) + rows.size)
                if int(rows[-1]) - int(rows[0]) == rows.size - 1 and (np.diff(rows) == 1).all() else None)
        self._validated = (self._version, rows, span, list(handles) if type(handles) is list else None,
                           rows.tobytes())
        return rows

    def _span(self, rows):
        """``slice`` of consecutive increasing ``rows`` as validated last, else None (use fancy indexing)."""
        last = self._validated
        return last[2] if last is not None and last[1] is rows else None

    @staticmethod
    def _counts(handles, num_new_tokens) -> np.ndarray:
        n = np.asarray(num_new_tokens)
        if not np.issubdtype(n.dtype, np.integer):
            raise TypeError(f"num_new_tokens must be integers, got {n.dtype}")
        size = np.asarray(handles).size
        if n.ndim > 1 or (n.ndim == 1 and n.size != size):
            raise ValueError(f"num_new_tokens must be an int or have one entry per handle ({size}), got shape "
                             f"{list(n.shape)}")
        n = np.broadcast_to(n.astype(np.int64), (size,))
        if size and n.min() < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {int(n.min())}")
        return n

    def _new_row(self) -> int:
        if self._spare_rows:
            return self._spare_rows.pop()
        row = self._next_row
        if row == self._alive.size:
            grow = self._alive.size
            self._tables = np.concatenate([self._tables, np.zeros_like(self._tables[:grow])])
            self._lens, self._nblocks, self._base, self._mark = (
                np.concatenate([a, np.zeros_like(a)]) for a in (self._lens, self._nblocks, self._base, self._mark))
            self._alive = np.concatenate([self._alive, np.zeros_like(self._alive)])
        self._next_row += 1
        return row

    def _grow_columns(self, need: int) -> None:
        width = self._tables.shape[1]
        while width < need:
            width *= 2
        wider = np.zeros((self._tables.shape[0], width), dtype=np.int32)
        wider[:, : self._tables.shape[1]] = self._tables
        self._tables = wider

    def _pop(self, n: int) -> np.ndarray:
        self._num_free -= n
        return self._free[self._num_free: self._num_free + n][::-1].copy()

    def _push(self, blocks: np.ndarray) -> None:
        self._free[self._num_free: self._num_free + blocks.size] = blocks
        self._num_free += blocks.size
