"""``PagedAttention``: vLLM's static cache and decode operations under their vLLM names."""

from __future__ import annotations

from . import decode, kv_cache


class PagedAttention:
    """Static methods with vLLM's names and arguments (``vllm.attention.ops.paged_attn.PagedAttention``).

    NumPy arrays run on the CPU; CuPy arrays run the CUDA kernels.
    """

    get_supported_head_sizes = staticmethod(decode.get_supported_head_sizes)
    get_kv_cache_shape = staticmethod(kv_cache.get_kv_cache_shape)
    split_kv_cache = staticmethod(kv_cache.split_kv_cache)
    write_to_paged_cache = staticmethod(kv_cache.write_to_paged_cache)
    copy_blocks = staticmethod(kv_cache.copy_blocks)
    swap_blocks = staticmethod(kv_cache.swap_blocks)
    forward_decode = staticmethod(decode.forward_decode)
