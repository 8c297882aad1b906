"""vLLM-shaped attention backend without torch: Backend (static), Metadata (per step), Impl (per layer).

Batch layout, as in vLLM: prefill sequences and their tokens first, then decode sequences (one token each). Unlike
vLLM, a batch may mix both kinds (each part is computed on its own slice and written to its own rows of one output),
and a prefill sequence may have ``context_len > 0`` tokens already in the paged cache (chunked prefill / prefix
caching): its new queries attend to cached + new keys with the same block rule at absolute positions.
"""

from __future__ import annotations

import functools
import math
import numbers
import sys
import weakref
from dataclasses import dataclass, replace

from . import _cache_cuda, _decode_cuda
from . import decode as _decode
from . import kv_cache as _kv
from ._checks import array_module, as_array, check_array, check_int, dtype_name, to_host
from .attention import blocksparse_prefill, blocksparse_prefill_paged
from .layout import BlockSparseLayout
from .params import BlocksparseParams

#: slot_mapping value of a token whose K/V must not be written (profiling runs, CUDA-graph padding).
PAD_SLOT_ID = -1
#: Validated decode signatures kept per layer (a serving loop sees a few batch sizes; more are re-validated).
_MAX_PLANS = 256
#: Metadata fields a builder may leave to be made on first read (see the metadata's notes).
_DEFERRABLE = frozenset(("seq_lens", "context_lens_tensor", "query_start_loc", "seq_start_loc"))


@dataclass
class BlocksparseFlashAttentionMetadata:
    """Per-step batch description (vLLM's FlashAttention metadata fields).

    Integer arrays are int32 except ``slot_mapping`` (int64), all on the step's array module (NumPy or CuPy).
    ``P = num_prefills`` sequences come first, then ``num_decode_tokens`` decode sequences.

    Attributes
    ----------
    num_prefills, num_prefill_tokens, num_decode_tokens : int
    slot_mapping : int64 ``[num_tokens]``
        Cache slot ``block * block_size + offset`` of each token's K/V; ``PAD_SLOT_ID`` (-1) skips the write.
        Example: block table ``[7, 2]``, block size 16, position 17 -> slot ``2 * 16 + 1 = 33``.
    seq_lens : list[int] or None
        Total length (context + new tokens) per sequence, on the host.
    seq_lens_tensor : int32 ``[batch]``
    max_query_len, max_prefill_seq_len, max_decode_seq_len : int
    query_start_loc, seq_start_loc : int32 ``[P + 1]`` (prefill part) or ``[batch + 1]``
        Cumulative new-token counts and cumulative total lengths.
    context_lens_tensor : int32 ``[batch]``
        Tokens already in the cache before this step.
    block_tables : int32 ``[batch, max_blocks]``
        Cache block ids per sequence, zero-padded.
    use_cuda_graph : bool
    blocks_to_copy : int64 ``[K, 2]`` (host)
        Copy-on-write block pairs to ``copy_blocks`` before this step's K/V writes (from the builder).
    max_slot : int or None
        Largest entry of ``slot_mapping``, known on the host (set by the builder). With it, ``forward`` checks the
        slots against the cache without reading ``slot_mapping`` back from the GPU.

    Notes
    -----
    Metadata the builder makes on CuPy creates ``seq_lens``, ``context_lens_tensor``, ``query_start_loc`` and
    ``seq_start_loc`` on first read (a decode step reads none of them, and making them costs a few microseconds of
    host time per step). They read like any other field (``dataclasses.replace`` and ``dataclasses.asdict``
    included); only ``vars()`` shows the fields not read yet as missing.
    """

    num_prefills: int
    num_prefill_tokens: int
    num_decode_tokens: int
    slot_mapping: object
    seq_lens: list | None
    seq_lens_tensor: object
    max_query_len: int | None
    max_prefill_seq_len: int
    max_decode_seq_len: int
    query_start_loc: object | None
    seq_start_loc: object | None
    context_lens_tensor: object | None
    block_tables: object
    use_cuda_graph: bool = False
    blocks_to_copy: object = None
    max_slot: int | None = None

    @property
    def num_tokens(self) -> int:
        return self.num_prefill_tokens + self.num_decode_tokens

    def __getattr__(self, name):
        # Reached only for names not in the instance: a field the builder left to be made on first read, through
        # the instance's "_deferred" entry ``(make, state)``, ``make(state, name)`` giving the field's value.
        deferred = self.__dict__.get("_deferred")
        if deferred is None or name not in _DEFERRABLE:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        value = self.__dict__[name] = deferred[0](deferred[1], name)
        return value

    @functools.cached_property
    def prefill_metadata(self) -> "BlocksparseFlashAttentionMetadata | None":
        """The first ``num_prefills`` sequences and ``num_prefill_tokens`` tokens; None if there are none."""
        if self.num_prefills == 0:
            return None
        P, T = self.num_prefills, self.num_prefill_tokens
        return replace(self, num_decode_tokens=0, slot_mapping=self.slot_mapping[:T],
                       seq_lens=None if self.seq_lens is None else self.seq_lens[:P],
                       seq_lens_tensor=self.seq_lens_tensor[:P], max_decode_seq_len=0,
                       query_start_loc=self.query_start_loc[:P + 1], seq_start_loc=self.seq_start_loc[:P + 1],
                       context_lens_tensor=self.context_lens_tensor[:P], block_tables=self.block_tables[:P],
                       use_cuda_graph=False)

    @functools.cached_property
    def decode_metadata(self) -> "BlocksparseFlashAttentionMetadata | None":
        """The decode sequences (one token each) after the prefills; None if there are none."""
        if self.num_decode_tokens == 0:
            return None
        P, T = self.num_prefills, self.num_prefill_tokens
        return replace(self, num_prefills=0, num_prefill_tokens=0, slot_mapping=self.slot_mapping[T:],
                       seq_lens=None, seq_lens_tensor=self.seq_lens_tensor[P:], max_query_len=None,
                       max_prefill_seq_len=0, query_start_loc=None, seq_start_loc=None, context_lens_tensor=None,
                       block_tables=self.block_tables[P:])


class BlocksparseFlashAttentionImpl:
    """One block-sparse attention layer: writes K/V to the paged cache, then runs prefill and decode.

    Parameters follow vLLM's ``BlocksparseFlashAttentionImpl``. ``num_heads`` / ``num_kv_heads`` are per rank;
    ``blocksparse_params`` is a :class:`BlocksparseParams` (or vLLM's dict plus ``tp_rank``/``tp_size`` keys) whose
    head counts must match. ``scale`` None means ``1 / sqrt(head_size)``. Unsupported features (alibi, sliding
    window, logits soft cap, non-decoder attention) raise at construction.
    """

    def __init__(self, num_heads: int, head_size: int, scale, num_kv_heads: int | None, alibi_slopes,
                 sliding_window, kv_cache_dtype: str, blocksparse_params, logits_soft_cap=None,
                 attn_type: str = "decoder"):
        num_heads = check_int("num_heads", num_heads, minimum=1)
        num_kv_heads = num_heads if num_kv_heads is None else check_int("num_kv_heads", num_kv_heads, minimum=1)
        head_size = check_int("head_size", head_size, minimum=1)
        if alibi_slopes is not None:
            raise ValueError("alibi_slopes are not supported by block-sparse attention (pass None)")
        if sliding_window is not None:
            raise ValueError("sliding_window is not supported by block-sparse attention (pass None)")
        if logits_soft_cap is not None:
            raise ValueError("logits_soft_cap is not supported by block-sparse attention (pass None)")
        if attn_type != "decoder":
            raise NotImplementedError(f"attn_type {attn_type!r} is not supported; only 'decoder'")
        if kv_cache_dtype not in _kv.KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {_kv.KV_CACHE_DTYPES}, got {kv_cache_dtype!r}")
        if head_size not in _decode.get_supported_head_sizes():
            raise ValueError(f"head_size {head_size} is not supported; supported: "
                             f"{_decode.get_supported_head_sizes()}")
        if isinstance(blocksparse_params, dict):
            extra = {k: blocksparse_params[k] for k in ("tp_rank", "tp_size") if k in blocksparse_params}
            rest = {k: v for k, v in blocksparse_params.items() if k not in extra}
            rest = {"num_heads": num_heads, "num_kv_heads": num_kv_heads, **rest}   # vLLM fills these in
            blocksparse_params = BlocksparseParams.from_vllm_dict(rest, **extra)
        if not isinstance(blocksparse_params, BlocksparseParams):
            raise TypeError(f"blocksparse_params must be BlocksparseParams or a dict, got "
                            f"{type(blocksparse_params).__name__}")
        p = blocksparse_params
        if (p.num_heads, p.num_kv_heads) != (num_heads, num_kv_heads):
            raise ValueError(f"blocksparse_params has num_heads={p.num_heads}, num_kv_heads={p.num_kv_heads} but "
                             f"the layer has num_heads={num_heads}, num_kv_heads={num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_size = num_heads, num_kv_heads, head_size
        self.scale = 1.0 / math.sqrt(head_size) if scale is None else float(scale)
        self.kv_cache_dtype = kv_cache_dtype
        self.params = p
        self.layout = BlockSparseLayout.from_params(p)
        # Decode-only GPU steps whose array signature passed every check once (see _decode_plan_key).
        self._plans: dict[tuple, tuple] = {}
        # [plan, weak reference to the kv_cache, its key half, its value half] of the last planned step, or empty.
        self._cache_views: list = []

    def forward(self, query, key, value, kv_cache, attn_metadata: BlocksparseFlashAttentionMetadata,
                k_scale: float = 1.0, v_scale: float = 1.0, output=None):
        """Attention for one step.

        Parameters
        ----------
        query : ``[T, num_heads * head_size]``; key, value : ``[T, num_kv_heads * head_size]`` (fp16/bf16)
        kv_cache : ``(2, num_blocks, block_size * num_kv_heads * head_size)`` or an empty array (no cache:
            prefill only, nothing written)
        attn_metadata : the step's metadata (prefill tokens first)
        output : optional ``[T, num_heads * head_size]`` buffer

        Returns
        -------
        ``[T, num_heads * head_size]`` in query's dtype.
        """
        m = attn_metadata
        plan_key = self._decode_plan_key(query, key, value, kv_cache, m, k_scale, v_scale, output)
        if plan_key is not None:
            plan = self._plans.get(plan_key)
            if plan is not None:
                return self._forward_planned(plan, query, key, value, kv_cache, m, output)
        query, key, value, kv_cache, output = (as_array(a) for a in (query, key, value, kv_cache, output))
        xp = array_module(query, key, value, kv_cache, output)
        T = query.shape[0] if query.ndim else 0
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_size
        check_array("query", query, shape=(None, H * D))
        check_array("key", key, shape=(T, Hkv * D))
        check_array("value", value, shape=(T, Hkv * D))
        if m.num_tokens != T:
            raise ValueError(f"attn_metadata describes {m.num_tokens} tokens but query has {T}")
        if output is None:
            output = xp.empty_like(query)
        check_array("output", output, shape=(T, H * D))
        if output.dtype != query.dtype:
            raise TypeError(f"output dtype ({dtype_name(output.dtype)}) must equal query dtype "
                            f"({dtype_name(query.dtype)})")
        q = query.reshape(T, H, D)
        k = key.reshape(T, Hkv, D)
        v = value.reshape(T, Hkv, D)
        out = output.reshape(T, H, D)
        has_cache = kv_cache is not None and kv_cache.size > 0
        if has_cache:
            key_cache, value_cache = _kv.split_kv_cache(kv_cache, Hkv, D)
            # Reading slot_mapping back to check it would synchronise with the GPU: use the builder's host-side
            # maximum instead, and skip the check under a CUDA graph (the kernel skips out-of-range slots anyway).
            if m.max_slot is not None and m.max_slot >= key_cache.shape[0] * key_cache.shape[3]:
                raise ValueError(f"slot_mapping has slot {m.max_slot} but the cache has "
                                 f"{key_cache.shape[0] * key_cache.shape[3]} slots")
            _kv.write_to_paged_cache(k, v, key_cache, value_cache, m.slot_mapping, self.kv_cache_dtype,
                                     k_scale, v_scale, check_slots=not m.use_cuda_graph and m.max_slot is None)
        P = m.num_prefill_tokens
        if m.prefill_metadata is not None:
            pm = m.prefill_metadata
            cu_q = pm.query_start_loc
            context = to_host(pm.context_lens_tensor) if pm.context_lens_tensor is not None else None
            if context is None or not context.any():
                blocksparse_prefill(q[:P], k[:P], v[:P], cu_q, cu_q, self.layout, sm_scale=self.scale, out=out[:P])
            else:
                if not has_cache:
                    raise ValueError("prefill sequences with context_len > 0 need the paged kv_cache")
                # Contexts are read in place through the block tables (the NumPy path gathers them).
                blocksparse_prefill_paged(q[:P], k[:P], v[:P], key_cache, value_cache, pm.block_tables, cu_q, context,
                                          self.layout, sm_scale=self.scale, out=out[:P],
                                          kv_cache_dtype=self.kv_cache_dtype, k_scale=k_scale, v_scale=v_scale)
        if m.num_decode_tokens:
            if not has_cache:
                raise ValueError("decode tokens need the paged kv_cache")
            # A decode-only batch is its own decode part: no sliced metadata view needed.
            dm = m.decode_metadata if m.num_prefills else m
            q_dec, out_dec = (q[P:], out[P:]) if P else (q, out)
            args = (q_dec, key_cache, value_cache, dm.block_tables, dm.seq_lens_tensor, *self._decode_args(k_scale,
                                                                                                     v_scale))
            _decode.forward_decode(*args, out=out_dec)
            if plan_key is not None:
                launch = _decode.validated_launch(*args, out=out_dec)
                if launch is not None:
                    fp8 = self.kv_cache_dtype != "auto"
                    scales = (_kv._scale("k_scale", k_scale), _kv._scale("v_scale", v_scale)) if fp8 else (1.0, 1.0)
                    if len(self._plans) >= _MAX_PLANS:
                        self._plans.clear()
                    half_bytes = kv_cache[0].nbytes
                    # The decode kernel's own launch plan (grid, scalars, workspace) is resolved once here too.
                    decode_plan = _decode_cuda.plan_of(q_dec, key_cache, dm.block_tables, **launch)
                    write_plan = _cache_cuda.write_plan(k, v, value_cache, m.slot_mapping, fp8=fp8, k_scale=scales[0],
                                                        v_scale=scales[1])
                    self._plans[plan_key] = (key_cache.shape, value_cache.shape, half_bytes,
                                             key_cache.shape[0] * key_cache.shape[3], write_plan, decode_plan)
        return output

    def _decode_args(self, k_scale, v_scale) -> tuple:
        """The scalar arguments of this layer's :func:`~cubsattn.decode.forward_decode` calls."""
        p = self.params
        return (p.max_seqlen, self.kv_cache_dtype, self.num_kv_heads, self.scale, None, k_scale, v_scale, p.tp_rank,
                p.local_blocks, p.vert_stride, p.block_size, p.head_sliding_step)

    def _decode_plan_key(self, query, key, value, kv_cache, m, k_scale, v_scale, output):
        """Hashable key of a decode-only step on CuPy arrays, or None (any other step takes the checked path).

        Every check of :meth:`forward`, of the cache write and of the decode call depends on the arrays' shapes,
        strides and dtypes, the cache's alignment, the scales and the metadata's counts only, so a key that passed
        them once passes them again. Values are not in it: the slot bound is checked against the builder's host-side
        ``max_slot`` on every call, and the kernels skip out-of-range slots and block ids and clamp lengths. Metadata
        without ``max_slot`` (made by hand) outside a CUDA graph takes the checked path, which reads the slots back.
        """
        if m.num_prefills or not m.num_decode_tokens or (m.max_slot is None and not m.use_cuda_graph):
            return None
        cupy = sys.modules.get("cupy")
        if cupy is None:
            return None
        nd = cupy.ndarray
        sm, bt, sl = m.slot_mapping, m.block_tables, m.seq_lens_tensor
        if not (type(query) is nd and type(key) is nd and type(value) is nd and type(kv_cache) is nd
                and type(sm) is nd and type(bt) is nd and type(sl) is nd and (output is None or type(output) is nd)):
            return None
        if not ((type(k_scale) is float or isinstance(k_scale, numbers.Real))
                and (type(v_scale) is float or isinstance(v_scale, numbers.Real))):
            return None  # scales in arrays: their values are read on the checked path
        sig = (query.shape, query.strides, query.dtype, key.shape, key.strides, key.dtype, value.shape,
               value.strides, value.dtype, kv_cache.shape, kv_cache.strides, kv_cache.dtype,
               kv_cache.data.ptr % 16 == 0,
               None if output is None else (output.shape, output.strides, output.dtype),
               sm.shape, sm.strides, sm.dtype, bt.shape, bt.strides, bt.dtype, sl.shape, sl.strides, sl.dtype,
               m.num_prefill_tokens, m.num_decode_tokens, m.use_cuda_graph, m.max_slot is None,
               type(k_scale), k_scale, type(v_scale), v_scale, cupy.cuda.runtime.getDevice())
        return sig

    def _forward_planned(self, plan, query, key, value, kv_cache, m, output):
        """:meth:`forward` of a decode-only step whose key passed every check before: views and two launches."""
        key_shape, value_shape, half_bytes, num_slots, write_plan, decode_plan = plan
        if m.max_slot is not None and m.max_slot >= num_slots:
            raise ValueError(f"slot_mapping has slot {m.max_slot} but the cache has {num_slots} slots")
        T = query.shape[0]
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_size
        cupy = sys.modules["cupy"]
        if output is None:
            output = cupy.empty_like(query)
        views = self._cache_views
        if views and views[0] is plan and views[1]() is kv_cache:  # a serving loop passes a layer one cache
            key_cache, value_cache = views[2], views[3]
        else:
            # The cache is C-contiguous (part of the key): its two halves as arrays on its memory, without indexing.
            key_cache = cupy.ndarray(key_shape, kv_cache.dtype, kv_cache.data)
            value_cache = cupy.ndarray(value_shape, kv_cache.dtype, kv_cache.data + half_bytes)
            views = self._cache_views = [plan, None, key_cache, value_cache]
            # Dropped with the cache, so that the views do not keep a cache the caller let go of in memory.
            views[1] = weakref.ref(kv_cache, lambda _, views=views: views.clear())
        _cache_cuda.launch_write(write_plan, key.reshape(T, Hkv, D), value.reshape(T, Hkv, D), key_cache, value_cache,
                                 m.slot_mapping)
        _decode_cuda.launch_plan(decode_plan, query.reshape(T, H, D), key_cache, value_cache, m.block_tables,
                                 m.seq_lens_tensor, output.reshape(T, H, D))
        return output


class BlocksparseFlashAttentionBackend:
    """Static, stateless entry points (vLLM's ``AttentionBackend``)."""

    @staticmethod
    def get_name() -> str:
        return "BLOCK_SPARSE_FLASH_ATTN"

    @staticmethod
    def get_impl_cls():
        return BlocksparseFlashAttentionImpl

    @staticmethod
    def get_metadata_cls():
        return BlocksparseFlashAttentionMetadata

    @staticmethod
    def get_builder_cls():
        from .metadata_builder import BlocksparseMetadataBuilder

        return BlocksparseMetadataBuilder

    @staticmethod
    def get_state_cls():
        from .cuda_graph import DecodeGraphRunner

        return DecodeGraphRunner

    @staticmethod
    def make_metadata(*args, **kwargs) -> BlocksparseFlashAttentionMetadata:
        return BlocksparseFlashAttentionMetadata(*args, **kwargs)

    get_kv_cache_shape = staticmethod(_kv.get_kv_cache_shape)
    swap_blocks = staticmethod(_kv.swap_blocks)
    copy_blocks = staticmethod(_kv.copy_blocks)
