"""Builds one step's :class:`BlocksparseFlashAttentionMetadata` from sequence states and a block allocator.

Every integer array of a step is written into one host buffer and reaches the GPU in one copy; the metadata's arrays
are views of that one device buffer. With CuPy the host buffer is page-locked and the copy asynchronous: the buffers
form a ring, each reused only after the GPU has consumed its last copy (a CUDA event), so building the next step never
waits for the GPU and never overwrites data still in flight.

Buffer layout (int32 units), ``T`` tokens, ``N`` sequences, block-table width ``W``::

    [ slot_mapping (int64, 2T) | seq_lens N | context_lens N | query_start_loc N+1 | seq_start_loc N+1 | tables N*W ]
"""

from __future__ import annotations

import collections
import weakref

import numpy as np

from ._checks import check_int
from .backend import PAD_SLOT_ID, BlocksparseFlashAttentionMetadata
from .block_manager import BlockAllocator

#: Page-locked staging buffers kept per builder: steps the GPU may lag behind the host before a build waits.
MAX_STAGING_BUFFERS = 32

# Ring entries of dropped builders whose last copy had not completed: a buffer freed into CuPy's pinned memory pool
# could be handed out and written (to another builder, or any other user of the pool) while the GPU still reads it.
# Kept until their copies are done; pruned whenever a ring is dropped or a buffer allocated.
_RETIRED: list = []


class BlocksparseMetadataBuilder:
    """Turns "these sequences compute these many new tokens" into metadata, reserving cache slots on the way.

    Parameters
    ----------
    allocator : BlockAllocator
        Owns the sequences' block tables; ``build`` appends the new tokens to it.
    xp : module
        ``numpy`` or ``cupy``: where the metadata's integer arrays live.

    Examples
    --------
    >>> import numpy as np
    >>> alloc = BlockAllocator(num_blocks=64, block_size=16)
    >>> a, b = alloc.add_sequence(), alloc.add_sequence()
    >>> builder = BlocksparseMetadataBuilder(alloc)
    >>> m = builder.build(prefills=[(a, 20), (b, 5)], decodes=[])       # two prompts
    >>> m.num_prefill_tokens, m.query_start_loc.tolist(), m.slot_mapping[:3].tolist()
    (25, [0, 20, 25], [0, 1, 2])
    >>> m = builder.build(prefills=[(b, 30)], decodes=[a])              # chunk of b (context 5) + decode of a
    >>> m.context_lens_tensor.tolist(), m.seq_lens, m.slot_mapping[-1].item()   # a's 21st token: block 1, offset 4
    ([5, 20], [35, 21], 20)
    """

    def __init__(self, allocator: BlockAllocator, *, xp=np):
        if not isinstance(allocator, BlockAllocator):
            raise TypeError(f"allocator must be a BlockAllocator, got {type(allocator).__name__}")
        self.allocator = allocator
        self.xp = xp
        self._staging = None if xp is np else _PinnedRing()
        self._scratch: dict[tuple, _Fields] = {}  # small fields per (tokens, sequences), CuPy metadata only
        self._host = None  # the page-locked buffer of the step being built

    def build(self, prefills, decodes, *, pad_to: int | None = None,
              block_table_width: int | None = None) -> BlocksparseFlashAttentionMetadata:
        """Metadata for one step; reserves the new tokens' slots in the allocator.

        Parameters
        ----------
        prefills : sequence of ``(handle, num_new_tokens)``
            Prompt (or prompt-chunk) sequences; tokens already stored count as context.
        decodes : sequence of handles
            Sequences generating one token each.
        pad_to : int, optional
            Pad the decode part to this many sequences (CUDA-graph batch): padding rows have slot -1,
            seq_len 1 and an all-zero block table. Only for decode-only steps.
        block_table_width : int, optional
            Columns of ``block_tables`` (fixed for CUDA graphs); default the batch's largest block count.

        The copy-on-write block pairs that must be copied (``copy_blocks``) before the K/V writes are returned in
        ``metadata.blocks_to_copy`` (int64 ``[K, 2]``, host).
        """
        prefills = list(prefills)
        if not prefills:
            return self._build_decode(decodes, pad_to, block_table_width)
        if pad_to is not None:
            raise ValueError("pad_to (CUDA-graph padding) applies to decode-only steps")
        num_prefills = len(prefills)
        p_counts = np.array([check_int("num_new_tokens", n, minimum=1) for _, n in prefills], dtype=np.int64)
        handles = np.concatenate((np.array([h for h, _ in prefills], dtype=np.int64),
                                  np.asarray(decodes, dtype=np.int64).reshape(-1)))
        counts = np.ones(handles.size, dtype=np.int64)
        counts[:num_prefills] = p_counts
        # The allocator checks the handles (live, distinct) and reserves the slots in one pass.
        context, slots, cow, tables = self.allocator.append_step(handles, counts, width=block_table_width)
        batch = handles.size
        f, host_tables = self._buffers(slots.size, batch, tables.shape[1])
        f.slots[...] = slots
        np.add(context, counts, out=f.seq)
        f.context[...] = context
        np.cumsum(counts, out=f.qsl[1:])
        host_tables[...] = tables
        return self._finish(f, host_tables, num_prefills=num_prefills, num_prefill_tokens=int(p_counts.sum()),
                            num_decode_tokens=batch - num_prefills, max_query_len=int(counts.max()),
                            max_prefill_seq_len=int(f.seq[:num_prefills].max()),
                            max_decode_seq_len=int(f.seq[num_prefills:].max(initial=0)), use_cuda_graph=False,
                            cow=cow, max_slot=int(slots.max()))

    def _build_decode(self, decodes, pad_to, width):
        """A decode-only step: the allocator's one-token append, no per-token expansion."""
        if pad_to is not None:
            pad_to = check_int("pad_to", pad_to, minimum=np.size(decodes))
        context, lens, slots, cow, tables, longest = self.allocator._decode_step(decodes, width)
        real = context.size
        if real == 0:
            raise ValueError("a step needs at least one prefill or decode sequence")
        batch = real if pad_to is None else pad_to
        f, host_tables = self._buffers(batch, batch, tables.shape[1])
        f.slots[:real] = slots
        f.seq[:real] = lens
        f.context[:real] = context
        host_tables[:real] = tables
        if batch > real:  # CUDA-graph padding rows
            f.slots[real:] = PAD_SLOT_ID
            f.seq[real:] = 1
            f.context[real:] = 0
            host_tables[real:] = 0
        return self._finish(f, host_tables, num_prefills=0, num_prefill_tokens=0, num_decode_tokens=batch,
                            max_query_len=1, max_prefill_seq_len=0, max_decode_seq_len=longest,
                            use_cuda_graph=pad_to is not None, cow=cow, max_slot=int(slots.max()))

    def _buffers(self, num_tokens: int, batch: int, width: int):
        """(the step's small fields, its ``[batch, width]`` block-table buffer), laid out as the module docstring says.

        NumPy metadata owns one new buffer holding both. With a staging ring the tables go straight into the step's
        page-locked buffer, while the small fields are computed in ordinary memory (page-locked memory is for the copy
        engine, not for the CPU's reads) in a scratch buffer kept per shape, and copied in front of the tables just
        before the transfer.
        """
        num_small = 2 * num_tokens + 4 * batch + 2
        size = num_small + batch * width
        if self._staging is None:
            host = np.empty(size, dtype=np.int32)
            return _Fields(host[:num_small], num_tokens, batch), host[num_small:].reshape(batch, width)
        fields = self._scratch.get((num_tokens, batch))
        if fields is None:
            if len(self._scratch) >= 16:
                self._scratch.clear()
            fields = self._scratch[num_tokens, batch] = _Fields(np.empty(num_small, np.int32), num_tokens, batch)
        self._host = self._staging.take(size)
        return fields, self._host[num_small:].reshape(batch, width)

    def _finish(self, f, host_tables, *, cow, **fields) -> BlocksparseFlashAttentionMetadata:
        """Cumulative lengths, the one transfer, and the metadata whose arrays are views of the transferred buffer."""
        np.add.accumulate(f.seq, out=f.ssl[1:])
        if self._staging is None:
            return BlocksparseFlashAttentionMetadata(
                seq_lens=f.seq.tolist(), slot_mapping=f.slots, seq_lens_tensor=f.seq, context_lens_tensor=f.context,
                query_start_loc=f.qsl, seq_start_loc=f.ssl, block_tables=host_tables, blocks_to_copy=cow, **fields)
        import cupy

        host = self._host
        host[:f.buf.size] = f.buf
        base = self._staging.upload(host)
        n, offsets = f.seq.size, f.offsets
        # The fields forward reads are made now; the others (and the host list seq_lens) on first read, from the
        # device buffer and a copy of the host lengths (the scratch fields are reused by the next step). Made without
        # __init__, which would take all of them: the keys below with _DEFERRABLE are the dataclass's fields.
        m = BlocksparseFlashAttentionMetadata.__new__(BlocksparseFlashAttentionMetadata)
        m.__dict__.update(fields, slot_mapping=cupy.ndarray(f.slots.shape, np.int64, base),
                          seq_lens_tensor=cupy.ndarray((n,), np.int32, base + 4 * offsets[0]),
                          block_tables=cupy.ndarray(host_tables.shape, np.int32, base + 4 * offsets[4]),
                          blocks_to_copy=cow, _deferred=(_deferred_field, (base, n, offsets, f.seq.copy())))
        return m


def _deferred_field(state, name: str):
    """Field ``name`` of staged metadata (``state``: device buffer, sequences, field offsets, host lengths)."""
    import cupy

    base, n, (_, o_ctx, o_qsl, o_ssl, _), seq = state
    if name == "seq_lens":
        return seq.tolist()
    offset, size = {"context_lens_tensor": (o_ctx, n), "query_start_loc": (o_qsl, n + 1),
                    "seq_start_loc": (o_ssl, n + 1)}[name]
    return cupy.ndarray((size,), np.int32, base + 4 * offset)


class _Fields:
    """Views of the small int32 fields of a step (``T`` tokens, ``N`` sequences) in one buffer ``[2T + 4N + 2]``.

    The entries every step of this shape shares are written once: ``query_start_loc[0]``, ``seq_start_loc[0]`` and,
    when ``T == N`` (one token per sequence), the whole ``query_start_loc``.
    """

    def __init__(self, buf: np.ndarray, num_tokens: int, batch: int):
        o = 2 * num_tokens
        self.buf = buf
        self.offsets = (o, o + batch, o + 2 * batch, o + 3 * batch + 1, buf.size)
        self.slots = buf[:o].view(np.int64)
        self.seq, self.context = buf[o:o + batch], buf[o + batch:o + 2 * batch]
        self.qsl, self.ssl = buf[o + 2 * batch:o + 3 * batch + 1], buf[o + 3 * batch + 1:]
        self.qsl[0] = self.ssl[0] = 0
        if num_tokens == batch:
            self.qsl[...] = _arange(batch + 1)


_ARANGE = np.arange(1, dtype=np.int32)


def _arange(n: int) -> np.ndarray:
    """int32 ``0 .. n - 1`` (a shared read-only array, grown on demand: query_start_loc of a decode step)."""
    global _ARANGE
    if _ARANGE.size < n:
        _ARANGE = np.arange(max(n, 2 * _ARANGE.size), dtype=np.int32)
        _ARANGE.flags.writeable = False
    return _ARANGE[:n]


class _PinnedRing:
    """Page-locked host buffers for asynchronous uploads, each reused once the GPU has consumed its last copy."""

    def __init__(self):
        # Entries: [pinned int32 array, its address, event of its last copy or None, the event's device].
        self._ring = collections.deque()
        self._current = None
        weakref.finalize(self, _retire, self._ring).atexit = False  # at exit no copy needs protecting

    def take(self, size: int) -> np.ndarray:
        """A pinned int32 buffer of ``size`` elements that no pending copy reads."""
        ring = self._ring
        entry = ring[0] if ring else None
        busy = entry is not None and entry[2] is not None and not entry[2].done
        if entry is None or (busy and len(ring) < MAX_STAGING_BUFFERS):
            entry = self._new(size)
        else:
            ring.popleft()
            if busy:
                entry[2].synchronize()  # the GPU is MAX_STAGING_BUFFERS steps behind: wait for it
            if entry[0].size < size:
                entry = self._new(size)
        ring.append(entry)
        self._current = entry
        return entry[0][:size]

    @staticmethod
    def _new(size: int) -> list:
        import cupyx

        _retire(())  # prune
        # A power of two: the tables widen by one column every block_size steps, and a buffer that fitted only the
        # step it was made for would be replaced (a page-locked allocation, tens of microseconds) at nearly every step.
        host = cupyx.empty_pinned(1 << max(size - 1, 1 << 14).bit_length(), dtype=np.int32)
        return [host, host.ctypes.data, None, None]

    def upload(self, host: np.ndarray):
        """``MemoryPointer`` to a new device copy of ``host`` (the buffer :meth:`take` returned last), queued on the
        current stream."""
        import cupy

        entry = self._current
        # Rounded up to a power of two like the staging buffers, so that the memory pool hands back the same few
        # blocks step after step instead of allocating a new one whenever the tables widen.
        dev = cupy.cuda.alloc(1 << (host.nbytes - 1).bit_length())
        stream = cupy.cuda.get_current_stream()
        cupy.cuda.runtime.memcpyAsync(dev.ptr, entry[1], host.nbytes, cupy.cuda.runtime.memcpyHostToDevice,
                                      stream.ptr)
        if entry[2] is None or entry[3] != dev.device_id:  # an event records only on streams of its own device
            entry[2], entry[3] = cupy.cuda.Event(block=False, disable_timing=True), dev.device_id
        entry[2].record(stream)
        return dev


def _retire(entries) -> None:
    """Keep those of ``entries`` whose last copy may be pending in ``_RETIRED``; drop the ones whose copy is done."""
    _RETIRED[:] = [e for e in (*_RETIRED, *entries) if e[2] is not None and not e[2].done]
