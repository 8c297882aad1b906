"""Paged KV cache on CuPy: the CUDA write / copy_blocks kernels and swap_blocks, bit-exact against the oracles of
tests/test_kv_cache.py (flat-index writer, independent E4M3 rounding) and the NumPy path. The write tests run on
both write kernels (the library picks one by batch size; the ``write_kernel`` fixture forces each)."""

from __future__ import annotations

import numpy as np
import pytest

from cubsattn import PagedAttention, _cache_cuda
from cubsattn import kv_cache as kvc
from test_kv_cache import (BF16, FP16, bits, e4m3_decode_reference, e4m3_reference, oracle_write, poisoned_cache,
                           random_caches, random_slots)

pytestmark = pytest.mark.gpu

DTYPES = (FP16, BF16)
# (num_tokens, num_kv_heads, head_size, block_size, num_blocks): head sizes decode supports, several block sizes,
# token counts that leave a partial tile of 32.
CASES = [(37, 2, 64, 16, 8), (5, 1, 128, 8, 3), (300, 8, 128, 16, 40), (64, 4, 80, 32, 4), (33, 3, 96, 16, 4),
         (70, 2, 112, 16, 8), (50, 2, 256, 16, 6), (9, 1, 32, 8, 4)]
CASE_IDS = [f"T{t}-H{h}-D{d}-bs{b}" for t, h, d, b, _ in CASES]


@pytest.fixture
def cp():
    return pytest.importorskip("cupy")


@pytest.fixture(params=["tiles", "tokens"])
def write_kernel(request, monkeypatch):
    """Send every write to one kernel: the tile walker ("tiles") or the per-token scatter ("tokens")."""
    monkeypatch.setattr(_cache_cuda, "SCATTER_MAX_TOKENS", 0 if request.param == "tiles" else 2**31)
    return request.param


def gpu_write(cp, key, value, kv_host, slots, h, d, *, kv_cache_dtype="auto", k_scale=1.0, v_scale=1.0, **kw):
    """Copy the (poisoned) host cache to the device, write there, return the result on the host."""
    kv = cp.asarray(kv_host)
    kc, vc = kvc.split_kv_cache(kv, h, d)
    kvc.write_to_paged_cache(key, value, kc, vc, cp.asarray(slots), kv_cache_dtype, k_scale, v_scale, **kw)
    return kv.get()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("slot_dtype", [np.int64, np.int32])
def test_write_matches_oracle(cp, write_kernel, rng, dtype, case, slot_dtype):
    t, h, d, bs, nb = case
    key = rng.standard_normal((t, h, d)).astype(dtype)
    value = rng.standard_normal((t, h, d)).astype(dtype)
    slots = random_slots(rng, t, nb * bs).astype(slot_dtype)
    kv = poisoned_cache(nb, bs, h, d, dtype)
    got = gpu_write(cp, cp.asarray(key), cp.asarray(value), kv, slots, h, d)
    want = oracle_write(kv.reshape(2, -1), key, value, slots, block_size=bs)
    np.testing.assert_array_equal(bits(got.reshape(2, -1)), bits(want))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [c for c in CASES if c[2] % 16 == 0], ids=[i for c, i in zip(CASES, CASE_IDS)
                                                                          if c[2] % 16 == 0])
def test_write_fp8_matches_oracle(cp, write_kernel, rng, dtype, case):
    t, h, d, bs, nb = case
    key = (rng.standard_normal((t, h, d)) * 2).astype(dtype)
    value = (rng.standard_normal((t, h, d)) * 200).astype(dtype)  # saturates at 448 * 0.25
    slots = random_slots(rng, t, nb * bs, pad_every=3)
    kv = poisoned_cache(nb, bs, h, d, np.uint8)
    got = gpu_write(cp, cp.asarray(key), cp.asarray(value), kv, slots, h, d, kv_cache_dtype="fp8", k_scale=0.7,
                    v_scale=0.25)
    want = oracle_write(kv.reshape(2, -1), key, value, slots, block_size=bs, fp8=True, k_scale=0.7, v_scale=0.25)
    np.testing.assert_array_equal(got.reshape(2, -1), want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [1.0, 0.37, 2.0**-7])
def test_fp8_every_16bit_input(cp, write_kernel, dtype, scale):
    """All 65536 fp16 / bf16 bit patterns through the CUDA quantiser: saturation, subnormals, ties, +-0, inf, NaN."""
    x = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(dtype).reshape(512, 1, 128)
    kv = poisoned_cache(32, 16, 1, 128, np.uint8)
    got = gpu_write(cp, cp.asarray(x), cp.asarray(x), kv, np.arange(512), 1, 128, kv_cache_dtype="fp8_e4m3",
                    k_scale=scale, v_scale=scale)
    k, v = kvc.gather_kv(*kvc.split_kv_cache(got, 1, 128), np.arange(32), 512, kv_cache_dtype="fp8")
    want = e4m3_decode_reference(e4m3_reference(x, scale))
    nan = np.isnan(want)
    assert np.isnan(x.astype(np.float32)[nan]).all() and np.isnan(k[nan]).all() and np.isnan(v[nan]).all()
    np.testing.assert_array_equal(k[~nan], want[~nan].astype(np.float32))
    np.testing.assert_array_equal(v[~nan], want[~nan].astype(np.float32))


def prefill_slots(rng, seq_lens, block_size, num_blocks, *, contexts):
    """Packed prefill (chunked: sequence i's first token at position contexts[i] of its own blocks, random block
    order), with a padding token after every sequence: the layout the write kernel's full 8-slot groups target."""
    perm = rng.permutation(num_blocks)
    slots, b = [], 0
    for n, c in zip(seq_lens, contexts):
        pos = np.arange(c, c + n)
        table = perm[b: b + -(-(c + n) // block_size)]
        b += table.size
        slots += [table[pos // block_size] * block_size + pos % block_size, [-1]]
    return np.concatenate(slots).astype(np.int64)


# (block_size, seq_lens, contexts): aligned and misaligned starts, sequences shorter than a group, block sizes
# that are not a multiple of 8 (element stores only).
PREFILL = [(16, (64, 40, 3, 77), (0, 0, 5, 13)), (8, (33, 16, 50), (4, 0, 1)), (32, (100, 7), (32, 9)),
           (12, (50, 29), (0, 7))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prefill", PREFILL, ids=[f"bs{p[0]}" for p in PREFILL])
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_write_prefill_runs(cp, write_kernel, rng, dtype, prefill, kv_cache_dtype):
    bs, seq_lens, contexts = prefill
    h, d, nb = 3, 64, 64
    fp8 = kv_cache_dtype == "fp8"
    slots = prefill_slots(rng, seq_lens, bs, nb, contexts=contexts)
    t = slots.size
    key = (rng.standard_normal((t, h, d)) * 3).astype(dtype)
    value = (rng.standard_normal((t, h, d)) * 3).astype(dtype)
    kv = poisoned_cache(nb, bs, h, d, np.uint8 if fp8 else dtype)
    for slot_dtype in (np.int32, np.int64):
        got = gpu_write(cp, cp.asarray(key), cp.asarray(value), kv, slots.astype(slot_dtype), h, d,
                        kv_cache_dtype=kv_cache_dtype, k_scale=0.3, v_scale=0.6)
        want = oracle_write(kv.reshape(2, -1), key, value, slots, block_size=bs, fp8=fp8, k_scale=0.3, v_scale=0.6)
        np.testing.assert_array_equal(bits(got.reshape(2, -1)), bits(want))


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
@pytest.mark.parametrize("min_part_chunks", [1, 16, 4096])
def test_write_tile_heads_per_cta(cp, rng, monkeypatch, kv_cache_dtype, min_part_chunks):
    """The tile kernel with 1, 2 and all 4 heads per CTA (32 / 32 / 64 threads, 8 / 16 / 32 staged chunks per token)
    on prefill runs (full 16-slot segments and partial ones) next to scattered tokens and padding."""
    monkeypatch.setattr(_cache_cuda, "SCATTER_MAX_TOKENS", 0)
    monkeypatch.setattr(_cache_cuda, "MIN_PART_CHUNKS", min_part_chunks)
    h, d, bs, nb = 4, 64, 16, 48
    fp8 = kv_cache_dtype == "fp8"
    runs = prefill_slots(rng, (40, 23), bs, nb // 2, contexts=(0, 5))  # blocks 0 .. nb / 2 - 1
    scattered = nb // 2 * bs + rng.permutation(nb // 2 * bs)[:21]       # the other blocks
    slots = np.concatenate([runs, scattered])
    t = slots.size
    key = (rng.standard_normal((t, h, d)) * 3).astype(BF16)
    value = (rng.standard_normal((t, h, d)) * 3).astype(BF16)
    kv = poisoned_cache(nb, bs, h, d, np.uint8 if fp8 else BF16)
    got = gpu_write(cp, cp.asarray(key), cp.asarray(value), kv, slots, h, d, kv_cache_dtype=kv_cache_dtype,
                    k_scale=0.3, v_scale=0.6)
    want = oracle_write(kv.reshape(2, -1), key, value, slots, block_size=bs, fp8=fp8, k_scale=0.3, v_scale=0.6)
    np.testing.assert_array_equal(bits(got.reshape(2, -1)), bits(want))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_many_scales_every_16bit_input(cp, write_kernel, rng, dtype):
    """The division-free quantiser against the NumPy one (IEEE division) over every 16-bit input for random scales
    across the whole allowed range [2**-64, 2**64], its ends, and significands 1 and 2 - 2**-23."""
    x = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(dtype).reshape(512, 1, 128)
    x_d = cp.asarray(x)
    scales = [2.0**-64, 2.0**64, 2.0**-64 * (2 - 2**-23), 2.0**63 * (2 - 2**-23), 1.0, 1.0 - 2**-24, 3.0]
    scales += (2.0 ** rng.uniform(-64, 64, 40)).tolist()
    host = poisoned_cache(32, 16, 1, 128, np.uint8)
    kc_h, vc_h = kvc.split_kv_cache(host, 1, 128)
    for k_scale, v_scale in zip(scales, scales[::-1]):
        got = gpu_write(cp, x_d, x_d, host, np.arange(512), 1, 128, kv_cache_dtype="fp8", k_scale=k_scale,
                        v_scale=v_scale)
        kvc.write_to_paged_cache(x, x, kc_h, vc_h, np.arange(512), "fp8", k_scale, v_scale)
        # NaN inputs give a NaN code; its sign bit is not specified (the GPU's float ops drop it).
        nan = (host & 0x7F) == 0x7F
        assert ((got & 0x7F) == 0x7F)[nan].all(), f"k_scale={k_scale!r}, v_scale={v_scale!r}"
        np.testing.assert_array_equal(got[~nan], host[~nan], err_msg=f"k_scale={k_scale!r}, v_scale={v_scale!r}")


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_gather_kv_cupy_equals_numpy(cp, rng, kv_cache_dtype):
    h, d, bs, nb, seq_len = 2, 64, 16, 10, 37
    fp8 = kv_cache_dtype == "fp8"
    kv = rng.standard_normal(kvc.get_kv_cache_shape(nb, bs, h, d)).astype(BF16)
    if fp8:
        kv = rng.integers(0, 256, kv.shape).astype(np.uint8)
    kc, vc = kvc.split_kv_cache(kv, h, d)
    table = rng.permutation(nb)[:5].astype(np.int32)
    want = kvc.gather_kv(kc, vc, table, seq_len, kv_cache_dtype=kv_cache_dtype, k_scale=0.5, v_scale=2.0)
    kc_d, vc_d = kvc.split_kv_cache(cp.asarray(kv), h, d)
    got = kvc.gather_kv(kc_d, vc_d, cp.asarray(table), seq_len, kv_cache_dtype=kv_cache_dtype, k_scale=0.5,
                        v_scale=2.0)
    for g, w in zip(got, want):
        assert isinstance(g, cp.ndarray) and g.dtype == np.float32 and g.device == kc_d.device
        np.testing.assert_array_equal(g.get(), w)  # NaN codes: NaN in both (payloads may differ)
    with pytest.raises(TypeError, match="arguments mix NumPy"):
        kvc.gather_kv(kc_d, vc_d, table, seq_len, kv_cache_dtype=kv_cache_dtype)
    with pytest.raises(ValueError, match=r"block_table_row\[1\] cache block id \(10\) is out of range"):
        kvc.gather_kv(kc_d, vc_d, cp.asarray([0, 10]), 17, kv_cache_dtype=kv_cache_dtype)


def lone_tile_slots(rng, block_size, num_blocks):
    """64 tokens (4 tiles of 16) mixing single tokens alone in their blocks (decode-like: the tile kernel's lone
    tiles) with runs of consecutive slots: tile 0 ends with a run that continues into tile 1 (whose other tokens
    are alone), tile 2 is alone tokens and padding, tile 3 mixes pairs and alone tokens."""
    perm = iter(rng.permutation(num_blocks).tolist())

    def alone():
        return next(perm) * block_size + int(rng.integers(0, block_size))

    slots = [alone() for _ in range(12)]
    b = next(perm) * block_size
    slots += [b + i for i in range(7)]                       # tokens 12..18: one run across the tile boundary
    slots += [alone() if i % 4 else -1 for i in range(32 - len(slots) + 16)]  # rest of tile 1, tile 2
    b = next(perm) * block_size
    slots += [b + 2, b + 3, alone(), alone(), b + 9, b + 10, b + 11] + [alone() for _ in range(9)]
    return np.array(slots, dtype=np.int64)


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
@pytest.mark.parametrize("block_size", [16, 32])
def test_write_lone_tokens(cp, rng, write_kernel, kv_cache_dtype, block_size):
    """Decode-like writes (every token alone in its block) next to runs, in one launch; and a full decode batch."""
    h, d, nb = 2, 128, 80
    fp8 = kv_cache_dtype == "fp8"
    for slots in (lone_tile_slots(rng, block_size, nb),
                  rng.permutation(nb)[:70] * block_size + rng.integers(0, block_size, 70)):
        t = slots.size
        key = (rng.standard_normal((t, h, d)) * 3).astype(BF16)
        value = (rng.standard_normal((t, h, d)) * 3).astype(BF16)
        kv = poisoned_cache(nb, block_size, h, d, np.uint8 if fp8 else BF16)
        got = gpu_write(cp, cp.asarray(key), cp.asarray(value), kv, slots, h, d, kv_cache_dtype=kv_cache_dtype,
                        k_scale=0.3, v_scale=0.6)
        want = oracle_write(kv.reshape(2, -1), key, value, slots, block_size=block_size, fp8=fp8, k_scale=0.3,
                            v_scale=0.6)
        np.testing.assert_array_equal(bits(got.reshape(2, -1)), bits(want))


def test_write_strided_and_misaligned(cp, write_kernel, rng):
    """Fused qkv slices (16-byte aligned rows) and a token stride of h*d + 3 elements (element-load fallback)."""
    t, hq, h, d, bs, nb = 45, 4, 2, 64, 16, 4
    qkv = rng.standard_normal((t, hq + 2 * h, d)).astype(BF16)
    slots = random_slots(rng, t, nb * bs)
    kv = poisoned_cache(nb, bs, h, d, BF16)
    qkv_d = cp.asarray(qkv)
    got = gpu_write(cp, qkv_d[:, hq:hq + h], qkv_d[:, hq + h:], kv, slots, h, d)
    want = oracle_write(kv.reshape(2, -1), qkv[:, hq:hq + h], qkv[:, hq + h:], slots, block_size=bs)
    np.testing.assert_array_equal(bits(got.reshape(2, -1)), bits(want))
    flat = rng.standard_normal((t, h * d + 3)).astype(BF16)
    base = cp.asarray(flat)
    odd = cp.lib.stride_tricks.as_strided(base[:, 3:], shape=(t, h, d), strides=(base.strides[0], d * 2, 2))
    assert odd.strides[0] == (h * d + 3) * 2
    for cache_dtype, fp8 in ((BF16, False), (np.uint8, True)):
        kv = poisoned_cache(nb, bs, h, d, cache_dtype)
        got = gpu_write(cp, odd, odd, kv, slots, h, d, kv_cache_dtype="fp8" if fp8 else "auto")
        host = flat[:, 3:].reshape(t, h, d)
        want = oracle_write(kv.reshape(2, -1), host, host, slots, block_size=bs, fp8=fp8)
        np.testing.assert_array_equal(bits(got.reshape(2, -1)), bits(want))


def test_write_large_matches_numpy_path(cp, rng):
    t, h, d, bs = 4096, 8, 128, 16
    nb = t // bs + 8
    key = rng.standard_normal((t, h, d)).astype(BF16)
    slots = rng.permutation(nb * bs)[:t]
    for fp8 in (False, True):
        dt = np.uint8 if fp8 else BF16
        kv_cpu = poisoned_cache(nb, bs, h, d, dt)
        kv_gpu = gpu_write(cp, cp.asarray(key), cp.asarray(key[::-1].copy()), kv_cpu, slots, h, d,
                           kv_cache_dtype="fp8" if fp8 else "auto", k_scale=0.5, v_scale=2.0)
        kvc.write_to_paged_cache(key, key[::-1].copy(), *kvc.split_kv_cache(kv_cpu, h, d), slots,
                                 "fp8" if fp8 else "auto", 0.5, 2.0)
        np.testing.assert_array_equal(bits(kv_gpu), bits(kv_cpu))


def test_write_check_slots_false_skips_out_of_range(cp, write_kernel, rng):
    t, h, d, bs, nb = 40, 2, 64, 16, 4
    key = cp.asarray(rng.standard_normal((t, h, d)).astype(FP16))
    slots = random_slots(rng, t, nb * bs)
    slots[1::4] = nb * bs + np.arange(slots[1::4].size) * 1000  # out of range: must be skipped, not written
    kv = poisoned_cache(nb, bs, h, d, FP16)
    got = gpu_write(cp, key, key, kv, slots, h, d, check_slots=False)
    ok = np.where(slots < nb * bs, slots, -1)
    want = oracle_write(kv.reshape(2, -1), key.get(), key.get(), ok, block_size=bs)
    np.testing.assert_array_equal(bits(got.reshape(2, -1)), bits(want))
    with pytest.raises(ValueError, match=r"slot_mapping\[1\] \(64\) is out of range: the cache has 4 blocks x 16"):
        gpu_write(cp, key, key, kv, np.where(np.arange(t) == 1, 64, -1), h, d)


def test_split_views_on_device(cp):
    kv = cp.zeros(kvc.get_kv_cache_shape(4, 16, 2, 64), dtype=cp.float16)
    kc, vc = kvc.split_kv_cache(kv, 2, 64)
    assert kc.data.ptr == kv.data.ptr and vc.data.ptr == kv[1].data.ptr
    kc[1, 1, 2, 3, 4] = 5
    vc[3, 0, 7, 9] = 6
    flat = kv.reshape(2, -1).get()
    assert flat[0][((1 * 2 + 1) * 8 + 2) * 16 * 8 + 3 * 8 + 4] == 5 and flat[1][((3 * 2 + 0) * 64 + 7) * 16 + 9] == 6


def test_fp8_decode_on_device(cp):
    codes = np.arange(256, dtype=np.uint8)
    got = kvc.fp8_e4m3_to_float(cp.asarray(codes)).get()
    np.testing.assert_array_equal(got, e4m3_decode_reference(codes).astype(np.float32))


@pytest.mark.parametrize("dtype", [FP16, BF16, np.dtype(np.uint8)])
def test_copy_blocks_several_layers(cp, rng, dtype):
    caches = random_caches(rng, 3, 40, 16, 2, 64, dtype)
    perm = rng.permutation(40)
    pairs = np.stack([perm[:15], perm[15:30]], axis=1)
    dev = [cp.asarray(c) for c in caches]
    kvc.copy_blocks(caches, pairs)
    PagedAttention.copy_blocks(dev, cp.asarray(pairs.astype(np.int32)))
    for got, want in zip(dev, caches):
        np.testing.assert_array_equal(bits(got.get()), bits(want))
    with pytest.raises(ValueError, match="is both a source and a destination"):
        kvc.copy_blocks(dev, cp.asarray([[0, 1], [1, 2]]))


def test_copy_blocks_odd_block_size(cp, rng):
    """A block of 3 * 1 * 8 fp16 = 48 bytes: fewer vectors than threads."""
    caches = random_caches(rng, 2, 6, 3, 1, 8, FP16)
    pairs = np.array([[0, 5], [2, 3]])
    dev = [cp.asarray(c) for c in caches]
    kvc.copy_blocks(caches, pairs)
    kvc.copy_blocks(dev, pairs)
    for got, want in zip(dev, caches):
        np.testing.assert_array_equal(bits(got.get()), bits(want))


@pytest.mark.parametrize("pinned", [True, False])
def test_swap_round_trip(cp, rng, pinned):
    """GPU -> host -> GPU (another cache) and GPU -> GPU, with runs and single blocks."""
    shape = kvc.get_kv_cache_shape(12, 16, 2, 64)
    gpu = cp.asarray(rng.standard_normal(shape).astype(BF16))
    host = kvc.empty_host_cache(kvc.get_kv_cache_shape(8, 16, 2, 64), BF16, pinned=pinned)
    bits(host)[...] = 0
    out = poisoned_cache(10, 16, 2, 64, BF16)
    out_d = cp.asarray(out)
    to_host = np.array([[3, 0], [4, 1], [5, 2], [11, 6], [0, 7]])
    PagedAttention.swap_blocks(gpu, host, to_host)
    cp.cuda.get_current_stream().synchronize()
    ref = gpu.get()
    for s, d in to_host:
        np.testing.assert_array_equal(bits(host[:, d]), bits(ref[:, s]))
    back = np.array([[0, 9], [1, 2], [2, 3], [6, 0], [7, 1]])
    kvc.swap_blocks(host, out_d, back)
    cp.cuda.get_current_stream().synchronize()
    got = out_d.get()
    for s, d in back:
        np.testing.assert_array_equal(bits(got[:, d]), bits(host[:, s]))
    untouched = [i for i in range(10) if i not in back[:, 1]]
    np.testing.assert_array_equal(bits(got[:, untouched]), bits(out[:, untouched]))
    d2d = cp.asarray(poisoned_cache(12, 16, 2, 64, BF16))
    kvc.swap_blocks(gpu, d2d, cp.asarray([[1, 2], [2, 3], [3, 4]]))
    np.testing.assert_array_equal(bits(d2d[:, 2:5].get()), bits(ref[:, 1:4]))
    with pytest.raises(ValueError, match="are the same cache; use copy_blocks"):
        kvc.swap_blocks(gpu, gpu, np.array([[0, 1]]))


def test_gpu_errors(cp):
    key = cp.ones((4, 2, 264), cp.float16)
    kv = cp.zeros(kvc.get_kv_cache_shape(2, 16, 2, 264), cp.float16)
    kc, vc = kvc.split_kv_cache(kv, 2, 264)
    with pytest.raises(NotImplementedError, match=r"head_size \(264\) > 256 is not supported by the CUDA cache write"):
        kvc.write_to_paged_cache(key, key, kc, vc, cp.arange(4))
    with pytest.raises(TypeError, match="arguments mix NumPy"):
        kvc.write_to_paged_cache(key, key, kc, vc, np.arange(4))
    with pytest.raises(TypeError, match="key has dtype float32; supported: float16, bfloat16"):
        k32 = cp.ones((4, 2, 264), cp.float32)
        kvc.write_to_paged_cache(k32, k32, kc, vc, cp.arange(4))
