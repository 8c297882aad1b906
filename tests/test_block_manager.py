"""BlockAllocator: slot mappings and block tables against a plain-Python model, invariants under random operations,
copy-on-write through copy_blocks, out-of-blocks atomicity, errors, and the decode-step time budget."""

from __future__ import annotations

import time

import numpy as np
import pytest

from cubsattn import kv_cache as kvc
from cubsattn.block_manager import BlockAllocator, OutOfBlocksError


def check_invariants(alloc: BlockAllocator, live: dict[int, int]) -> None:
    """No block owned twice by one table, reference counts = number of holders, free list = unreferenced blocks."""
    holders = np.zeros(alloc.num_blocks, dtype=np.int64)
    tables = alloc.block_tables(list(live), width=max(1, max((-(-n // alloc.block_size) for n in live.values()),
                                                             default=1))) if live else np.zeros((0, 1))
    for row, (handle, n) in zip(tables, live.items()):
        used = -(-n // alloc.block_size)
        blocks = row[:used]
        assert len(set(blocks.tolist())) == used, "a table holds a block twice"
        assert (row[used:] == 0).all(), "padding must be 0"
        holders[blocks] += 1
        assert alloc.seq_lens([handle])[0] == n
    free = alloc.free_block_ids()
    assert len(set(free.tolist())) == free.size, "a block is on the free list twice"
    np.testing.assert_array_equal(alloc.ref_counts(), holders)
    assert set(free.tolist()) == set(np.flatnonzero(holders == 0).tolist()), "leaked or double-used block"
    assert alloc.num_free_blocks == free.size


def test_prefill_chunked_decode_slots():
    bs = 4
    alloc = BlockAllocator(16, bs)
    a, b = alloc.add_sequence(), alloc.add_sequence()
    slots, cow = alloc.append_tokens([a, b], [6, 3])  # prefill: a gets blocks 0, 1; b gets block 2
    np.testing.assert_array_equal(slots, [0, 1, 2, 3, 4, 5, 8, 9, 10])
    assert cow.shape == (0, 2) and slots.dtype == np.int64
    slots, _ = alloc.append_tokens([b, a], [2, 3])  # chunked prefill with context: b positions 3-4, a 6-8
    np.testing.assert_array_equal(slots, [11, 12, 6, 7, 16])  # b's 5th token opens block 3, a's 9th block 4
    np.testing.assert_array_equal(alloc.block_tables([a, b]), [[0, 1, 4], [2, 3, 0]])
    assert alloc.block_tables([a, b]).dtype == np.int32
    np.testing.assert_array_equal(alloc.seq_lens([a, b]), [9, 5])
    slots, _ = alloc.append_tokens([a, b], 1)  # decode
    np.testing.assert_array_equal(slots, [17, 13])
    assert alloc.block_tables([b], width=5).tolist() == [[2, 3, 0, 0, 0]]
    alloc.append_tokens([a], [0])
    assert alloc.seq_lens(a).tolist() == [10]


def test_fork_copy_on_write_with_copy_blocks(rng):
    bs, h, d = 4, 1, 64
    alloc = BlockAllocator(8, bs)
    kv = rng.standard_normal(kvc.get_kv_cache_shape(8, bs, h, d)).astype(np.float16)
    kc, vc = kvc.split_kv_cache(kv, h, d)
    parent = alloc.add_sequence()
    tokens = rng.standard_normal((6, h, d)).astype(np.float16)
    slots, _ = alloc.append_tokens(parent, 6)
    kvc.write_to_paged_cache(tokens, tokens, kc, vc, slots)
    child = alloc.fork(parent)
    assert alloc.ref_counts()[[0, 1]].tolist() == [2, 2]
    # The child appends into the shared, half-full block 1: it gets a private copy first.
    slots, cow = alloc.append_tokens(child, 1)
    assert cow.tolist() == [[1, 2]] and slots.tolist() == [2 * bs + 2]
    kvc.copy_blocks([kv], cow)
    new = rng.standard_normal((1, h, d)).astype(np.float16)
    kvc.write_to_paged_cache(new, new, kc, vc, slots)
    k_child, _ = kvc.gather_kv(kc, vc, alloc.block_tables(child)[0], 7)
    k_parent, _ = kvc.gather_kv(kc, vc, alloc.block_tables(parent)[0], 6)
    np.testing.assert_array_equal(k_child[:6], tokens.astype(np.float32))
    np.testing.assert_array_equal(k_child[6], new[0].astype(np.float32))
    np.testing.assert_array_equal(k_parent, tokens.astype(np.float32))
    # Now the parent is block 1's only holder: it writes in place.
    slots, cow = alloc.append_tokens(parent, 1)
    assert cow.shape == (0, 2) and slots.tolist() == [bs + 2]
    check_invariants(alloc, {parent: 7, child: 7})


def test_fork_all_holders_append_together():
    alloc = BlockAllocator(8, 4)
    a = alloc.add_sequence()
    alloc.append_tokens(a, 3)
    b, c = alloc.fork(a), alloc.fork(a)
    _, cow = alloc.append_tokens([a, b, c], 1)
    assert cow.shape == (2, 2) and (cow[:, 0] == 0).all()  # one holder keeps block 0, two get copies
    check_invariants(alloc, {a: 4, b: 4, c: 4})
    # A full shared block needs no copy.
    d = alloc.fork(a)
    _, cow = alloc.append_tokens(d, 1)
    assert cow.shape == (0, 2)
    check_invariants(alloc, {a: 4, b: 4, c: 4, d: 5})


def test_out_of_blocks_changes_nothing():
    alloc = BlockAllocator(4, 4)
    a, b = alloc.add_sequence(), alloc.add_sequence()
    alloc.append_tokens([a, b], [6, 4])
    before = (alloc.block_tables([a, b]), alloc.seq_lens([a, b]), alloc.free_block_ids(), alloc.ref_counts())
    assert alloc.blocks_needed([a, b], [3, 1]) == 2
    with pytest.raises(OutOfBlocksError, match=r"need 2 free blocks \(2 new, 0 copy-on-write\) but only 1 of 4"):
        alloc.append_tokens([a, b], [3, 1])
    after = (alloc.block_tables([a, b]), alloc.seq_lens([a, b]), alloc.free_block_ids(), alloc.ref_counts())
    for x, y in zip(before, after):
        np.testing.assert_array_equal(x, y)
    alloc.free(b)
    alloc.append_tokens([a], [10])
    assert alloc.num_free_blocks == 0
    check_invariants(alloc, {a: 16})


def test_random_operations_keep_invariants(rng):
    bs = 4
    alloc = BlockAllocator(64, bs)
    live: dict[int, int] = {}
    for step in range(600):
        op = rng.integers(4)
        if op == 0 or not live:
            live[alloc.add_sequence()] = 0
        elif op == 1:
            handles = rng.choice(list(live), size=rng.integers(1, len(live) + 1), replace=False)
            counts = rng.integers(0, 9, size=handles.size)
            needed = alloc.blocks_needed(handles, counts)
            free_before = alloc.num_free_blocks
            try:
                slots, cow = alloc.append_tokens(handles, counts)
            except OutOfBlocksError:
                assert needed > free_before
            else:
                assert free_before - alloc.num_free_blocks == needed
                assert slots.size == counts.sum() and len(set(slots.tolist())) == slots.size
                # Slots land in each sequence's own table, at the new positions.
                tables = alloc.block_tables(handles)
                i = 0
                for row, (hd, n) in enumerate(zip(handles.tolist(), counts.tolist())):
                    pos = np.arange(live[hd], live[hd] + n)
                    np.testing.assert_array_equal(slots[i:i + n], tables[row, pos // bs] * bs + pos % bs)
                    i += n
                    live[hd] += n
                if cow.size:
                    assert len(set(cow[:, 1].tolist())) == cow.shape[0]
                    assert not set(cow[:, 1].tolist()) & set(cow[:, 0].tolist())
        elif op == 2:
            parent = int(rng.choice(list(live)))
            live[alloc.fork(parent)] = live[parent]
        else:
            handles = rng.choice(list(live), size=rng.integers(1, min(3, len(live)) + 1), replace=False)
            alloc.free(handles)
            for hd in handles.tolist():
                del live[hd]
        check_invariants(alloc, live)
    alloc.free(list(live))
    assert alloc.num_free_blocks == 64 and not alloc.ref_counts().any()


def test_errors():
    alloc = BlockAllocator(8, 4)
    a = alloc.add_sequence()
    with pytest.raises(ValueError, match="handle 5 is not a live sequence"):
        alloc.append_tokens([a, 5], 1)
    with pytest.raises(ValueError, match=r"handles must be distinct, got \[0, 0\]"):
        alloc.append_tokens([a, a], 1)
    with pytest.raises(ValueError, match="num_new_tokens must be >= 0, got -1"):
        alloc.append_tokens([a], [-1])
    with pytest.raises(ValueError, match=r"one entry per handle \(1\), got shape \[2\]"):
        alloc.append_tokens([a], [1, 2])
    with pytest.raises(TypeError, match="num_new_tokens must be integers"):
        alloc.append_tokens([a], [1.5])
    with pytest.raises(TypeError, match="handles must be an int or a 1-D integer array"):
        alloc.seq_lens([0.5])
    alloc.append_tokens(a, 9)
    with pytest.raises(ValueError, match=r"width \(2\) must be >= the largest block count in the batch \(3\)"):
        alloc.block_tables([a], width=2)
    alloc.free(a)
    with pytest.raises(ValueError, match="handle 0 is not a live sequence"):
        alloc.fork(a)
    with pytest.raises(ValueError, match="num_blocks must be >= 1, got 0"):
        BlockAllocator(0, 16)


def test_tables_grow_beyond_initial_storage():
    alloc = BlockAllocator(4000, 2)
    handles = [alloc.add_sequence() for _ in range(40)]  # more than the 16 initial rows
    alloc.append_tokens(handles, 100)  # 50 blocks each, more than the 16 initial columns
    assert alloc.block_tables(handles).shape == (40, 50)
    assert alloc.block_tables(handles, width=80)[:, 50:].sum() == 0
    check_invariants(alloc, {h: 100 for h in handles})
    alloc.append_tokens(handles, 28)                    # 64 blocks each: every stored column is in use
    _, slots, _, tables = alloc.append_decode(handles)  # the decode step opens a 65th block per sequence
    assert tables.shape == (40, 65) and (slots == tables[:, 64].astype(np.int64) * 2).all()
    check_invariants(alloc, {h: 129 for h in handles})


def test_decode_step_bookkeeping_is_fast():
    """256 sequences: slot mapping + block table + seq_lens of one decode step well under 100 us (median)."""
    alloc = BlockAllocator(200_000, 16)
    handles = np.array([alloc.add_sequence() for _ in range(256)])
    alloc.append_tokens(handles, np.random.default_rng(0).integers(500, 4000, 256))
    times = []
    for _ in range(300):
        t = time.perf_counter()
        alloc.append_tokens(handles, 1)
        alloc.block_tables(handles)
        alloc.seq_lens(handles)
        times.append(time.perf_counter() - t)
    assert np.median(times) < 100e-6, f"median {np.median(times) * 1e6:.0f} us"


@pytest.mark.parametrize("bs", [4, 3])
def test_append_decode_matches_the_general_path(rng, bs):
    """Decode steps through append_decode (fast path, consecutive or scattered handles as arrays or lists, with and
    without forks, block sizes a power of two or not) give the slots, copy-on-write pairs and tables of the general
    append (array counts) on a twin allocator."""
    fast, ref = BlockAllocator(200, bs), BlockAllocator(200, bs)
    live: dict[int, int] = {}
    for step in range(400):
        op = rng.integers(12)      # forks are rare, so most decode steps find no shared block (the fast path)
        if op in (0, 1) or not live:
            h = fast.add_sequence()
            assert ref.add_sequence() == h
            live[h] = 0
        elif op == 2:
            parent = int(rng.choice(list(live)))
            h = fast.fork(parent)
            assert ref.fork(parent) == h
            live[h] = live[parent]
        elif op in (3, 4, 5) and len(live) > 1:
            h = int(rng.choice(list(live)))
            fast.free([h])
            ref.free([h])
            del live[h]
        elif op == 6:
            handles = rng.choice(list(live), size=rng.integers(1, len(live) + 1), replace=False)
            counts = rng.integers(0, 7, size=handles.size)
            try:
                got = fast.append_tokens(handles, counts)
            except OutOfBlocksError:
                continue
            want = ref.append_tokens(handles, counts)
            for x, y in zip(got, want):
                np.testing.assert_array_equal(x, y)
            live.update({hd: live[hd] + n for hd, n in zip(handles.tolist(), counts.tolist())})
        else:
            handles = np.array(sorted(live)) if op % 2 else rng.permutation(list(live))
            width = None if rng.integers(2) else int(max(-(-(live[hd] + 1) // bs) for hd in handles.tolist())) + 2
            try:
                context, slots, cow, tables = fast.append_decode(handles.tolist() if op >= 10 else handles,
                                                                 width=width)
            except OutOfBlocksError:
                continue
            ones = np.ones(handles.size, dtype=np.int64)
            for x, y in zip((context, slots, cow, tables), ref.append_step(handles, ones, width=width)):
                np.testing.assert_array_equal(x, y)
            assert not tables.flags.writeable and slots.dtype == np.int64 and tables.dtype == np.int32
            assert context.tolist() == [live[hd] for hd in handles.tolist()]
            for hd in handles.tolist():
                live[hd] += 1
        np.testing.assert_array_equal(fast.ref_counts(), ref.ref_counts())
        np.testing.assert_array_equal(fast.free_block_ids(), ref.free_block_ids())
        check_invariants(fast, live)


def test_append_decode_checks_before_changing_anything():
    alloc = BlockAllocator(3, 4)
    a, b = alloc.add_sequence(), alloc.add_sequence()
    alloc.append_tokens([a, b], [4, 3])                 # a's only block is full, b has room
    before = (alloc.block_tables([a, b]), alloc.seq_lens([a, b]), alloc.free_block_ids())
    with pytest.raises(ValueError, match=r"width \(1\) must be >= the largest block count in the batch \(2\)"):
        alloc.append_decode([a, b], width=1)
    alloc.append_tokens(b, 2)                           # takes the last free block
    before = (alloc.block_tables([a, b]), alloc.seq_lens([a, b]), alloc.free_block_ids())
    with pytest.raises(OutOfBlocksError, match=r"need 1 free blocks \(1 new, 0 copy-on-write\) but only 0 of 3"):
        alloc.append_decode([a, b])
    for x, y in zip(before, (alloc.block_tables([a, b]), alloc.seq_lens([a, b]), alloc.free_block_ids())):
        np.testing.assert_array_equal(x, y)


def test_validated_handles_are_rechecked_after_changes():
    alloc = BlockAllocator(16, 4)
    a, b = alloc.add_sequence(), alloc.add_sequence()
    handles = np.array([a, b])
    alloc.append_decode(handles)
    handles[1] = a                                      # the caller's array changed after it was validated
    with pytest.raises(ValueError, match=r"handles must be distinct, got \[0, 0\]"):
        alloc.append_decode(handles)
    alloc.append_decode([a, b])
    alloc.free(b)                                       # the same batch again, after one of its sequences ended
    with pytest.raises(ValueError, match="handle 1 is not a live sequence"):
        alloc.append_decode([a, b])
    with pytest.raises(TypeError, match="handles must be an int or a 1-D integer array"):
        alloc.append_decode([float(a)])
    assert alloc.seq_lens(a).tolist() == [2]                 # the two accepted steps only


def test_validated_list_of_handles_is_rechecked_when_it_changes():
    """A list equal to the last validated one skips the checks; a list changed in place, or any list after a
    sequence was added or freed, is checked again."""
    alloc = BlockAllocator(16, 4)
    a, b = alloc.add_sequence(), alloc.add_sequence()
    handles = [a, b]
    alloc.append_decode(handles)
    alloc.append_decode(list(handles))                  # an equal list (a new object)
    handles[1] = a                                      # the same list object, changed in place
    with pytest.raises(ValueError, match=r"handles must be distinct, got \[0, 0\]"):
        alloc.append_decode(handles)
    handles[1] = 9
    with pytest.raises(ValueError, match="handle 9 is not a live sequence"):
        alloc.append_decode(handles)
    alloc.append_decode([a, b])
    c = alloc.add_sequence()
    alloc.free(b)
    with pytest.raises(ValueError, match="handle 1 is not a live sequence"):
        alloc.append_decode([a, b])
    alloc.append_decode([a, c])
    alloc.append_decode(np.array([a, c]))               # the same batch as an array
    with pytest.raises(TypeError, match="handles must be an int or a 1-D integer array"):
        alloc.append_decode([0.5, c])
    assert alloc.seq_lens([a, c]).tolist() == [5, 2]


def test_block_tables_into_a_buffer():
    alloc = BlockAllocator(16, 4)
    a, b = alloc.add_sequence(), alloc.add_sequence()
    alloc.append_tokens([a, b], [9, 2])
    buf = np.full((2, 5), -7, dtype=np.int32)
    assert alloc.block_tables([b, a], width=5, out=buf) is buf
    assert buf.tolist() == [[3, 0, 0, 0, 0], [0, 1, 2, 0, 0]]
    with pytest.raises(ValueError, match=r"out must be an int32 NumPy array of shape \[2, 4\]"):
        alloc.block_tables([a, b], width=4, out=buf)
