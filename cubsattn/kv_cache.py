"""Paged KV cache operations (placeholder: being written for the paged KV cache issue)."""


def _todo(*args, **kwargs):
    raise NotImplementedError("paged KV cache operations are not written yet")


get_kv_cache_shape = split_kv_cache = write_to_paged_cache = copy_blocks = swap_blocks = _todo
