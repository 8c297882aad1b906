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

import numpy as np

from ._checks import check_int
from .backend import PAD_SLOT_ID, BlocksparseFlashAttentionMetadata
from .block_manager import BlockAllocator

#: Page-locked staging buffers kept per builder: steps the GPU may lag behind the host before a build waits.
MAX_STAGING_BUFFERS = 32


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
        host, views = self._layout(slots.size, batch, tables.shape[1])
        views["slots"][...] = slots
        seq = views["seq"]
        np.add(context, counts, out=seq)
        views["context"][...] = context
        qsl = views["qsl"]
        qsl[0] = 0
        np.cumsum(counts, out=qsl[1:])
        views["tables"][...] = tables
        return self._finish(host, views, num_prefills=num_prefills, num_prefill_tokens=int(p_counts.sum()),
                            num_decode_tokens=batch - num_prefills, max_query_len=int(counts.max()),
                            max_prefill_seq_len=int(seq[:num_prefills].max()),
                            max_decode_seq_len=int(seq[num_prefills:].max(initial=0)), use_cuda_graph=False,
                            cow=cow, max_slot=int(slots.max()))

    def _build_decode(self, decodes, pad_to, width):
        """A decode-only step: the allocator's one-token append, no per-token expansion."""
        if pad_to is not None:
            pad_to = check_int("pad_to", pad_to, minimum=np.size(decodes))
        context, slots, cow, tables = self.allocator.append_decode(decodes, width=width)
        real = context.size
        if real == 0:
            raise ValueError("a step needs at least one prefill or decode sequence")
        batch = real if pad_to is None else pad_to
        host, views = self._layout(batch, batch, tables.shape[1])
        out = views["slots"]
        out[:real] = slots
        out[real:] = PAD_SLOT_ID
        seq = views["seq"]
        np.add(context, 1, out=seq[:real])
        seq[real:] = 1
        ctx = views["context"]
        ctx[:real] = context
        ctx[real:] = 0
        views["qsl"][...] = _arange(batch + 1)
        views["tables"][:real] = tables
        views["tables"][real:] = 0
        return self._finish(host, views, num_prefills=0, num_prefill_tokens=0, num_decode_tokens=batch,
                            max_query_len=1, max_prefill_seq_len=0, max_decode_seq_len=int(seq.max()),
                            use_cuda_graph=pad_to is not None, cow=cow, max_slot=int(out.max()))

    def _layout(self, num_tokens: int, batch: int, width: int):
        """A host int32 buffer for one step and its named views (see the module docstring)."""
        size = 2 * num_tokens + 4 * batch + 2 + batch * width
        host = np.empty(size, dtype=np.int32) if self._staging is None else self._staging.take(size)
        o = 2 * num_tokens
        views = dict(slots=host[:o].view(np.int64), seq=host[o:o + batch], context=host[o + batch:o + 2 * batch],
                     qsl=host[o + 2 * batch:o + 3 * batch + 1], ssl=host[o + 3 * batch + 1:o + 4 * batch + 2],
                     tables=host[o + 4 * batch + 2:size].reshape(batch, width))
        return host, views

    def _finish(self, host, views, *, cow, **fields) -> BlocksparseFlashAttentionMetadata:
        """Cumulative lengths, the one transfer, and the metadata whose arrays are views of the transferred buffer."""
        seq, ssl = views["seq"], views["ssl"]
        ssl[0] = 0
        np.cumsum(seq, out=ssl[1:])
        seq_lens = seq.tolist()
        if self._staging is not None:
            dev = self._staging.upload(host)
            num_tokens, batch = views["slots"].size, seq.size
            o = 2 * num_tokens
            slots = dev[:o].view(np.int64)
            seq_t, ctx_t = dev[o:o + batch], dev[o + batch:o + 2 * batch]
            qsl, ssl = dev[o + 2 * batch:o + 3 * batch + 1], dev[o + 3 * batch + 1:o + 4 * batch + 2]
            tables = dev[o + 4 * batch + 2:].reshape(views["tables"].shape)
        else:
            slots, seq_t, ctx_t, qsl, tables = (views[k] for k in ("slots", "seq", "context", "qsl", "tables"))
        return BlocksparseFlashAttentionMetadata(
            slot_mapping=slots, seq_lens=seq_lens, seq_lens_tensor=seq_t, query_start_loc=qsl, seq_start_loc=ssl,
            context_lens_tensor=ctx_t, block_tables=tables, blocks_to_copy=cow, **fields)


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

        host = cupyx.empty_pinned(max(size, 1 << 14), dtype=np.int32)
        return [host, host.ctypes.data, None, None]

    def upload(self, host: np.ndarray):
        """Device copy of ``host`` (the buffer :meth:`take` returned last), queued on the current stream."""
        import cupy

        entry = self._current
        dev = cupy.empty(host.size, dtype=np.int32)
        stream = cupy.cuda.get_current_stream()
        cupy.cuda.runtime.memcpyAsync(dev.data.ptr, entry[1], host.nbytes, cupy.cuda.runtime.memcpyHostToDevice,
                                      stream.ptr)
        device = dev.data.device_id
        if entry[2] is None or entry[3] != device:  # an event records only on streams of its own device
            entry[2], entry[3] = cupy.cuda.Event(block=False, disable_timing=True), device
        entry[2].record(stream)
        return dev
