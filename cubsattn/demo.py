"""A Phi-3-small-shaped stack of attention layers (random weights) driving the backend end to end.

Every layer: ``x -> rmsnorm -> qkv projection -> attention (paged cache) -> output projection -> + x``. As in
Phi-3-small, layer ``i`` is dense when ``(i + 1) % dense_every == 0`` (odd layers for 2) and block-sparse otherwise;
dense layers use the same kernels with ``vert_stride=1`` (every block below the diagonal active).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from .backend import BlocksparseFlashAttentionImpl
from .block_manager import BlockAllocator
from .kv_cache import get_kv_cache_shape
from .layout import BlockSparseLayout
from .metadata_builder import BlocksparseMetadataBuilder
from .params import BlocksparseParams


@dataclass(frozen=True)
class StackConfig:
    """Shape of the demo stack (per tensor-parallel rank)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_size: int
    block_size: int
    local_blocks: int
    vert_stride: int
    max_seqlen: int
    cache_block_size: int = 16
    dense_every: int = 2
    dtype: str = "bfloat16"
    homo_head_group: bool = False

    def params(self, dense: bool) -> BlocksparseParams:
        return BlocksparseParams(self.max_seqlen, self.num_heads, self.num_kv_heads, self.block_size,
                                 self.local_blocks, 1 if dense else self.vert_stride,
                                 homo_head_group=self.homo_head_group)


#: Phi-3-small's attention shape (8 of its 32 layers, to keep the demo quick).
PHI3_SMALL = StackConfig(num_layers=8, hidden_size=4096, num_heads=32, num_kv_heads=8, head_size=128, block_size=64,
                         local_blocks=16, vert_stride=8, max_seqlen=8192)
#: The same structure scaled down for the NumPy backend.
SMALL = StackConfig(num_layers=4, hidden_size=256, num_heads=4, num_kv_heads=2, head_size=64, block_size=16,
                    local_blocks=4, vert_stride=4, max_seqlen=1024)


class AttentionStack:
    """Random-weight layers with one paged KV cache each, stepping through the backend.

    With ``tp_size > 1`` this object is one tensor-parallel rank: it owns query heads ``active_head_range`` and the
    matching kv heads (column-parallel qkv projection), its own caches and allocator, and a row-parallel output
    projection whose partial sums ``all_reduce`` adds up over ranks (e.g. an NCCL all-reduce). The weights are slices
    of the same full random weights, so the ranks together compute exactly what ``tp_size=1`` computes.

    Parameters
    ----------
    config : StackConfig
        Whole-model shape (``num_heads`` / ``num_kv_heads`` over all ranks).
    xp : numpy or cupy
    num_cache_blocks : int
        Blocks per layer cache (all layers share one block allocator, as in vLLM).
    seed : int
    tp_rank, tp_size : int
    all_reduce : callable, optional
        ``all_reduce(array) -> array`` summing over ranks; required when ``tp_size > 1``.
    """

    def __init__(self, config: StackConfig, xp, num_cache_blocks: int, *, seed: int = 0, tp_rank: int = 0,
                 tp_size: int = 1, all_reduce=None):
        if tp_size > 1 and all_reduce is None:
            raise ValueError("tp_size > 1 needs all_reduce (the sum over ranks of the output projection)")
        if config.num_kv_heads % tp_size:
            raise ValueError(f"num_kv_heads ({config.num_kv_heads}) must be a multiple of tp_size ({tp_size})")
        self.config, self.xp, self.all_reduce = config, xp, all_reduce
        c = config
        self.dtype = np.dtype(ml_dtypes.bfloat16) if c.dtype == "bfloat16" else np.dtype(c.dtype)
        self.num_heads, self.num_kv_heads = c.num_heads // tp_size, c.num_kv_heads // tp_size
        D = c.head_size
        # Columns of the full qkv projection this rank keeps: its q heads, then its k heads, then its v heads.
        q0, k0 = tp_rank * self.num_heads * D, tp_rank * self.num_kv_heads * D
        cols = np.concatenate([np.arange(q0, q0 + self.num_heads * D),
                               c.num_heads * D + np.arange(k0, k0 + self.num_kv_heads * D),
                               (c.num_heads + c.num_kv_heads) * D + np.arange(k0, k0 + self.num_kv_heads * D)])
        rows = np.arange(q0, q0 + self.num_heads * D)
        rng = np.random.default_rng(seed)
        qkv_out = (c.num_heads + 2 * c.num_kv_heads) * D
        self.w_qkv, self.w_o, self.impls, self.caches = [], [], [], []
        for i in range(c.num_layers):
            dense = c.dense_every > 0 and (i + 1) % c.dense_every == 0
            # Python-float scales keep the weights float32 (a NumPy float64 scalar would promote them to float64).
            w_qkv = rng.standard_normal((c.hidden_size, qkv_out), np.float32) * float(c.hidden_size ** -0.5)
            w_o = rng.standard_normal((c.num_heads * D, c.hidden_size), np.float32) * float((c.num_heads * D) ** -0.5)
            self.w_qkv.append(xp.asarray(np.ascontiguousarray(w_qkv[:, cols])))
            self.w_o.append(xp.asarray(np.ascontiguousarray(w_o[rows])))
            full = c.params(dense)
            params = BlocksparseParams(full.max_seqlen, self.num_heads, self.num_kv_heads, full.block_size,
                                       full.local_blocks, full.vert_stride, homo_head_group=full.homo_head_group,
                                       tp_rank=tp_rank, tp_size=tp_size)
            self.impls.append(BlocksparseFlashAttentionImpl(self.num_heads, D, 1.0 / D, self.num_kv_heads, None,
                                                            None, "auto", params))
            shape = get_kv_cache_shape(num_cache_blocks, c.cache_block_size, self.num_kv_heads, D)
            self.caches.append(xp.zeros(shape, dtype=self.dtype))
        self.allocator = BlockAllocator(num_cache_blocks, c.cache_block_size)
        self.builder = BlocksparseMetadataBuilder(self.allocator, xp=xp)

    def forward(self, x, metadata):
        """Hidden states ``[T, hidden]`` (float32) after all layers, for the tokens ``metadata`` describes."""
        xp = self.xp
        hq, hkv = self.num_heads * self.config.head_size, self.num_kv_heads * self.config.head_size
        for w_qkv, w_o, impl, cache in zip(self.w_qkv, self.w_o, self.impls, self.caches):
            h = x / xp.sqrt((x * x).mean(axis=1, keepdims=True) + 1e-6)
            qkv = (h @ w_qkv).astype(self.dtype)
            attn = impl.forward(qkv[:, :hq], qkv[:, hq:hq + hkv], qkv[:, hq + hkv:], cache, metadata)
            y = attn.astype(np.float32) @ w_o
            x = x + (y if self.all_reduce is None else self.all_reduce(y))
        return x

    def sparsity(self, seq_lens) -> float:
        """Fraction of causal (query, key) pairs the block-sparse layers skip for these sequence lengths."""
        c = self.config
        layout = BlockSparseLayout.from_params(c.params(dense=False))
        kept = sum(layout.allowed_pairs(n) for n in seq_lens)
        causal = sum(c.num_heads * n * (n + 1) // 2 for n in seq_lens)
        return 1.0 - kept / causal


def _sync(xp):
    if xp is not np:
        xp.cuda.get_current_stream().synchronize()


def _inputs(rng_seed: int, num_tokens: int, hidden: int):
    return np.random.default_rng(rng_seed).standard_normal((num_tokens, hidden), np.float32)


def run_demo(config: StackConfig, xp, prompt_lens, decode_steps: int, *, out=print) -> bool:
    """Prefill ``prompt_lens`` prompts, decode ``decode_steps`` tokens each, check consistency; True if it holds."""
    c = config
    max_len = max(prompt_lens) + decode_steps
    blocks_per_seq = -(-max_len // c.cache_block_size)
    num_blocks = blocks_per_seq * (len(prompt_lens) + 1)
    stack = AttentionStack(c, xp, num_blocks)
    handles = [stack.allocator.add_sequence() for _ in prompt_lens]
    inputs = [_inputs(i, n + decode_steps, c.hidden_size) for i, n in enumerate(prompt_lens)]
    dense_layers = sum(1 for i in range(c.num_layers) if c.dense_every and (i + 1) % c.dense_every == 0)
    out(f"stack: {c.num_layers} layers ({c.num_layers - dense_layers} block-sparse, {dense_layers} dense), "
        f"hidden {c.hidden_size}, heads {c.num_heads}/{c.num_kv_heads} x {c.head_size}, {c.dtype}")
    out(f"prompts: {list(prompt_lens)} tokens; block-sparse layers skip {stack.sparsity(prompt_lens):.1%} of the "
        f"causal (query, key) pairs at these lengths")

    # Warm-up on a throw-away stack so that compilation stays out of the timings.
    warm = AttentionStack(c, xp, 2 * blocks_per_seq)
    wh = warm.allocator.add_sequence()
    warm.forward(xp.asarray(_inputs(99, 8, c.hidden_size)), warm.builder.build([(wh, 8)], []))
    warm.forward(xp.asarray(_inputs(98, 1, c.hidden_size)), warm.builder.build([], [wh]))
    _sync(xp)

    t0 = time.perf_counter()
    meta = stack.builder.build(list(zip(handles, prompt_lens)), [])
    x = xp.asarray(np.concatenate([inp[:n] for inp, n in zip(inputs, prompt_lens)]))
    hidden = stack.forward(x, meta)
    _sync(xp)
    prefill_s = time.perf_counter() - t0
    total_prompt = sum(prompt_lens)
    out(f"prefill: {total_prompt} tokens in {prefill_s * 1e3:.1f} ms = {total_prompt / prefill_s:,.0f} tokens/s")

    last = None
    t0 = time.perf_counter()
    for step in range(decode_steps):
        meta = stack.builder.build([], handles)
        x = xp.asarray(np.stack([inp[n + step] for inp, n in zip(inputs, prompt_lens)]))
        last = stack.forward(x, meta)
        if sys.stdout.isatty():
            done = (step + 1) * 30 // decode_steps
            print(f"\rdecode [{'#' * done}{'.' * (30 - done)}] {step + 1}/{decode_steps}", end="", flush=True)
    _sync(xp)
    if sys.stdout.isatty():
        print()
    decode_s = time.perf_counter() - t0
    generated = decode_steps * len(prompt_lens)
    out(f"decode: {decode_steps} steps x {len(prompt_lens)} sequences in {decode_s * 1e3:.1f} ms = "
        f"{decode_s / max(decode_steps, 1) * 1e3:.2f} ms/step, {generated / decode_s:,.0f} tokens/s")
    used = stack.allocator.num_blocks - stack.allocator.num_free_blocks
    per_block = c.cache_block_size * c.num_kv_heads * c.head_size * 2 * stack.dtype.itemsize
    out(f"KV cache: {used} of {stack.allocator.num_blocks} blocks per layer in use "
        f"({used * per_block * c.num_layers / 2**20:.1f} MiB over {c.num_layers} layers)")

    # Consistency: sequence 0's last token through one fresh prefill of everything it has seen.
    n0 = prompt_lens[0] + decode_steps
    fresh = AttentionStack(c, xp, blocks_per_seq + 1)
    h0 = fresh.allocator.add_sequence()
    again = fresh.forward(xp.asarray(inputs[0][:n0]), fresh.builder.build([(h0, n0)], []))
    if decode_steps:
        a, b = last[0], again[-1]
    else:
        a, b = hidden[prompt_lens[0] - 1], again[-1]
    a = a.get() if xp is not np else a
    b = b.get() if xp is not np else b
    err = float(np.abs(a - b).max() / (np.abs(b).max() + 1e-12))
    ok = err < 5e-2
    out(f"consistency: prefill+decode vs one prefill of sequence 0, max relative difference {err:.2e} "
        f"({'OK' if ok else 'FAILED'}; bf16 rounding through {c.num_layers} layers)")
    return ok
