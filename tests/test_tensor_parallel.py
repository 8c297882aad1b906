"""Tensor parallelism emulated in one process: each rank computes its own heads (global head offsets from tp_rank)
and the concatenation over ranks equals the single-device computation of all heads."""

import numpy as np
import pytest

from cubsattn import BlockSparseLayout, BlocksparseParams, PagedAttention, blocksparse_prefill

TOTAL_HEADS, TOTAL_KV, D, BLOCK, CACHE_BS = 8, 4, 64, 16, 16
MODES = {"per-q-head": dict(), "per-kv-head": dict(homo_head_group=True), "homo": dict(homo_head=True)}


def params(tp_rank, tp_size, mode):
    return BlocksparseParams(1024, TOTAL_HEADS // tp_size, TOTAL_KV // tp_size, BLOCK, 2, 4, **MODES[mode],
                             tp_rank=tp_rank, tp_size=tp_size)


def prefill_by_ranks(xp, tp_size, mode, q, k, v, cu):
    parts = []
    hq, hk = TOTAL_HEADS // tp_size, TOTAL_KV // tp_size
    for r in range(tp_size):
        lay = BlockSparseLayout.from_params(params(r, tp_size, mode))
        # Each rank owns contiguous arrays of its heads (as after a column-parallel qkv projection).
        own = [xp.ascontiguousarray(a) for a in (q[:, r * hq:(r + 1) * hq], k[:, r * hk:(r + 1) * hk],
                                                 v[:, r * hk:(r + 1) * hk])]
        parts.append(blocksparse_prefill(*own, cu, cu, lay, sm_scale=1 / D))
    return xp.concatenate(parts, axis=1)


def decode_by_ranks(xp, tp_size, mode, q, key_cache, value_cache, tables, lens):
    parts = []
    hq, hk = TOTAL_HEADS // tp_size, TOTAL_KV // tp_size
    for r in range(tp_size):
        p = params(r, tp_size, mode)
        # Each rank owns a cache holding only its kv heads.
        own = [xp.ascontiguousarray(a) for a in (q[:, r * hq:(r + 1) * hq], key_cache[:, r * hk:(r + 1) * hk],
                                                 value_cache[:, r * hk:(r + 1) * hk])]
        parts.append(PagedAttention.forward_decode(
            *own, tables, lens, 1024, "auto", hk, 1 / D, None, 1.0, 1.0, r, p.local_blocks, p.vert_stride, p.block_size,
            p.head_sliding_step))
    return xp.concatenate(parts, axis=1)


def inputs(xp, rng, dtype):
    lens = np.array([900, 333, 64, 1])
    cu = np.concatenate(([0], np.cumsum(lens))).astype(np.int32)
    q = xp.asarray(rng.standard_normal((cu[-1], TOTAL_HEADS, D)).astype(dtype))
    k = xp.asarray(rng.standard_normal((cu[-1], TOTAL_KV, D)).astype(dtype))
    v = xp.asarray(rng.standard_normal((cu[-1], TOTAL_KV, D)).astype(dtype))
    nblk = -(-lens.max() // CACHE_BS)
    tables = rng.permutation(len(lens) * nblk).reshape(len(lens), nblk).astype(np.int32)
    shape = PagedAttention.get_kv_cache_shape(len(lens) * nblk, CACHE_BS, TOTAL_KV, D)
    kv = xp.asarray(rng.standard_normal(shape).astype(dtype))
    key_cache, value_cache = PagedAttention.split_kv_cache(kv, TOTAL_KV, D)
    qd = xp.asarray(rng.standard_normal((len(lens), TOTAL_HEADS, D)).astype(dtype))
    return q, k, v, cu, qd, key_cache, value_cache, xp.asarray(tables), xp.asarray(lens.astype(np.int32))


def check(xp, rng, dtype, tp_size, mode):
    q, k, v, cu, qd, key_cache, value_cache, tables, lens = inputs(xp, rng, dtype)
    full_lay = BlockSparseLayout.from_params(params(0, 1, mode))
    full = blocksparse_prefill(q, k, v, cu, cu, full_lay, sm_scale=1 / D)
    ranks = prefill_by_ranks(xp, tp_size, mode, q, k, v, cu)
    assert bool((ranks == full).all()), "prefill: ranks differ from the full computation"
    p = params(0, 1, mode)
    full_dec = PagedAttention.forward_decode(qd, key_cache, value_cache, tables, lens, 1024, "auto", TOTAL_KV,
                                             1 / D, None, 1.0, 1.0, 0, p.local_blocks, p.vert_stride, p.block_size,
                                             p.head_sliding_step)
    ranks_dec = decode_by_ranks(xp, tp_size, mode, qd, key_cache, value_cache, tables, lens)
    assert bool((ranks_dec == full_dec).all()), "decode: ranks differ from the full computation"


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("tp_size", [2, 4])
def test_emulated_ranks_numpy(tp_size, mode, rng):
    check(np, rng, np.float32, tp_size, mode)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("tp_size", [2, 4])
def test_emulated_ranks_cupy(tp_size, mode, rng):
    import ml_dtypes

    cupy = pytest.importorskip("cupy")
    check(cupy, rng, ml_dtypes.bfloat16, tp_size, mode)


def test_rank_layout_is_slice_of_full():
    full = BlockSparseLayout.from_params(params(0, 1, "per-kv-head"))
    for r in range(2):
        part = BlockSparseLayout.from_params(params(r, 2, "per-kv-head"))
        np.testing.assert_array_equal(part.to_mask(), full.to_mask()[r * 4:(r + 1) * 4])


class ThreadAllReduce:
    """Sum over ranks for ranks running as threads (same summation order on every rank)."""

    def __init__(self, world):
        import threading

        self.barrier = threading.Barrier(world)
        self.parts = [None] * world

    def __call__(self, rank, y):
        # What an NCCL all-reduce of NCCL_FLOAT32 needs: a float64 partial would be summed as garbage there.
        assert y.dtype == np.float32, f"all-reduce input must be float32, got {y.dtype}"
        self.parts[rank] = y
        self.barrier.wait()
        total = sum(self.parts[1:], self.parts[0])
        self.barrier.wait()
        return total


def run_stack(stack, prompt, decode_inputs):
    h = stack.allocator.add_sequence()
    out = [stack.forward(prompt, stack.builder.build([(h, prompt.shape[0])], []))]
    for x in decode_inputs:
        out.append(stack.forward(x[None], stack.builder.build([], [h])))
    return np.concatenate(out)


@pytest.mark.parametrize("tp_size", [2, 4])
def test_demo_stack_tensor_parallel_threads(tp_size):
    import threading

    from cubsattn.demo import AttentionStack, StackConfig

    cfg = StackConfig(num_layers=2, hidden_size=64, num_heads=8, num_kv_heads=4, head_size=64, block_size=16,
                      local_blocks=2, vert_stride=4, max_seqlen=256, dtype="float16")
    rng = np.random.default_rng(0)
    prompt = rng.standard_normal((90, 64), np.float32)
    steps = rng.standard_normal((5, 64), np.float32)
    want = run_stack(AttentionStack(cfg, np, 32), prompt, steps)
    reduce = ThreadAllReduce(tp_size)
    results = [None] * tp_size

    def rank(r):
        stack = AttentionStack(cfg, np, 32, tp_rank=r, tp_size=tp_size, all_reduce=lambda y: reduce(r, y))
        results[r] = run_stack(stack, prompt, steps)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(tp_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in range(tp_size):
        np.testing.assert_array_equal(results[r], results[0])
    assert results[0].dtype == want.dtype == np.float32
    np.testing.assert_allclose(results[0], want, rtol=2e-3, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.multi_gpu
@pytest.mark.parametrize("mode", [[], ["--homo-head-group"]], ids=["per-q-head", "per-kv-head"])
def test_nccl_example(mode):
    """examples/tensor_parallel.py on 2 GPUs (and 4 where present): ranks agree and equal one GPU."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    cupy = pytest.importorskip("cupy")
    example = Path(__file__).resolve().parent.parent / "examples" / "tensor_parallel.py"
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0"}
    for tp in (2, 4):
        if cupy.cuda.runtime.getDeviceCount() < tp:
            continue
        res = subprocess.run([sys.executable, str(example), "--tp", str(tp), "--prompts", "700", "300",
                              "--decode-steps", "4", *mode], capture_output=True, text=True, env=env, timeout=600)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "ranks agree: True" in res.stdout and "(OK)" in res.stdout
