"""Builds one step's :class:`BlocksparseFlashAttentionMetadata` from sequence states and a block allocator."""

from __future__ import annotations

import numpy as np

from ._checks import check_int
from .backend import PAD_SLOT_ID, BlocksparseFlashAttentionMetadata
from .block_manager import BlockAllocator


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
        num_prefills = len(prefills)
        p_counts = np.array([check_int("num_new_tokens", n, minimum=1) for _, n in prefills], dtype=np.int64)
        handles = np.concatenate((np.array([h for h, _ in prefills], dtype=np.int64),
                                  np.asarray(decodes, dtype=np.int64).reshape(-1)))
        counts = np.ones(handles.size, dtype=np.int64)
        counts[:num_prefills] = p_counts
        if handles.size == 0:
            raise ValueError("a step needs at least one prefill or decode sequence")
        if pad_to is not None and prefills:
            raise ValueError("pad_to (CUDA-graph padding) applies to decode-only steps")
        # The allocator checks the handles (live, distinct) and reserves the slots in one pass.
        context, slots, cow, tables = self.allocator.append_step(handles, counts, width=block_table_width)
        seq_lens = context + counts
        num_decodes = handles.size - num_prefills
        if pad_to is not None:
            pad = check_int("pad_to", pad_to, minimum=num_decodes) - num_decodes
            slots = np.concatenate((slots, np.full(pad, PAD_SLOT_ID, dtype=np.int64)))
            seq_lens = np.concatenate((seq_lens, np.ones(pad, dtype=np.int64)))
            context = np.concatenate((context, np.zeros(pad, dtype=np.int64)))
            counts = np.concatenate((counts, np.ones(pad, dtype=np.int64)))
            tables = np.concatenate((tables, np.zeros((pad, tables.shape[1]), dtype=np.int32)))
            num_decodes += pad
        batch = num_prefills + num_decodes
        # One host buffer and one transfer for all int32 fields: cheap on the host and for the GPU.
        host = np.empty(4 * batch + 2 + tables.size, dtype=np.int32)
        host[:batch] = seq_lens
        host[batch:2 * batch] = context
        qsl = host[2 * batch:3 * batch + 1]
        qsl[0] = 0
        np.cumsum(counts, out=qsl[1:])
        ssl = host[3 * batch + 1:4 * batch + 2]
        ssl[0] = 0
        np.cumsum(seq_lens, out=ssl[1:])
        host[4 * batch + 2:] = tables.ravel()
        dev = self.xp.asarray(host)
        num_prefill_tokens = int(p_counts.sum())
        prefill_lens = seq_lens[:num_prefills]
        metadata = BlocksparseFlashAttentionMetadata(
            num_prefills=num_prefills,
            num_prefill_tokens=num_prefill_tokens,
            num_decode_tokens=num_decodes,
            slot_mapping=self.xp.asarray(slots),
            seq_lens=seq_lens.tolist(),
            seq_lens_tensor=dev[:batch],
            max_query_len=int(counts.max()),
            max_prefill_seq_len=int(prefill_lens.max(initial=0)),
            max_decode_seq_len=int(seq_lens[num_prefills:].max(initial=0)),
            query_start_loc=dev[2 * batch:3 * batch + 1],
            seq_start_loc=dev[3 * batch + 1:4 * batch + 2],
            context_lens_tensor=dev[batch:2 * batch],
            block_tables=dev[4 * batch + 2:].reshape(tables.shape),
            use_cuda_graph=pad_to is not None,
            blocks_to_copy=cow,
            max_slot=int(slots.max(initial=PAD_SLOT_ID)),
        )
        return metadata
