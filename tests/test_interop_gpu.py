"""Foreign GPU arrays (torch tensors through DLPack / __cuda_array_interface__) are accepted zero-copy and give the
same results as CuPy arrays; results come back as CuPy arrays."""

import numpy as np
import pytest

from cubsattn import BlockSparseLayout, BlocksparseParams, PagedAttention, blocksparse_prefill
from cubsattn._checks import as_array

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def torch():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    return torch


def test_as_array_is_zero_copy(torch):
    t = torch.randn(16, 8, device="cuda", dtype=torch.bfloat16)
    a = as_array(t)
    assert type(a).__module__.startswith("cupy") and a.shape == (16, 8) and a.data.ptr == t.data_ptr()
    assert str(a.dtype) == "bfloat16"


def test_prefill_and_decode_with_torch_tensors(torch):
    import cupy

    lay = BlockSparseLayout.from_params(BlocksparseParams(1024, 8, 2, 64, 2, 4))
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(300, 8, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(300, 2, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    cu = torch.tensor([0, 200, 300], device="cuda", dtype=torch.int32)
    got = blocksparse_prefill(q, k, k, cu, cu, lay)
    want = blocksparse_prefill(cupy.from_dlpack(q), cupy.from_dlpack(k), cupy.from_dlpack(k), cupy.asarray([0, 200, 300]),
                               cupy.asarray([0, 200, 300]), lay)
    assert isinstance(got, cupy.ndarray)
    assert bool((got == want).all())

    kv = torch.randn(*PagedAttention.get_kv_cache_shape(8, 16, 2, 128), device="cuda", dtype=torch.bfloat16,
                     generator=g)
    key_cache, value_cache = PagedAttention.split_kv_cache(cupy.from_dlpack(kv), 2, 128)
    tables = torch.arange(8, device="cuda", dtype=torch.int32).reshape(2, 4)
    lens = torch.tensor([60, 17], device="cuda", dtype=torch.int32)
    qd = q[:2]
    out = PagedAttention.forward_decode(qd, key_cache, value_cache, tables, lens, 1024, "auto", 2, None,
                                        blocksparse_local_blocks=2, blocksparse_vert_stride=4)
    ref = PagedAttention.forward_decode(cupy.from_dlpack(qd), key_cache, value_cache, cupy.from_dlpack(tables),
                                        cupy.from_dlpack(lens), 1024, "auto", 2, None, blocksparse_local_blocks=2,
                                        blocksparse_vert_stride=4)
    assert isinstance(out, cupy.ndarray) and bool((out == ref).all())
    assert np.isfinite(out.get().astype(np.float32)).all()
