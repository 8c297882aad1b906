"""Paged KV cache on NumPy: layout views, write (fp16/bf16/fp32/fp8), copy_blocks, swap_blocks, gather, errors.

The oracles here are independent of cubsattn.kv_cache: writes go through SPEC section 7's flat-index formulas, and
E4M3 rounding is computed from frexp / integer math in float64 (no ml_dtypes). tests/test_kv_cache_gpu.py reuses them.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from cubsattn import PagedAttention
from cubsattn import kv_cache as kvc

BF16 = np.dtype(ml_dtypes.bfloat16)
FP16 = np.dtype(np.float16)
FP32 = np.dtype(np.float32)
DTYPES = (FP16, BF16)
# (num_tokens, num_kv_heads, head_size, block_size, num_blocks)
CASES = [(37, 2, 64, 16, 8), (5, 1, 128, 8, 3), (64, 4, 32, 32, 4), (1, 3, 96, 16, 2)]
CASE_IDS = [f"T{t}-H{h}-D{d}-bs{b}" for t, h, d, b, _ in CASES]
CANARY = {FP16: 0x7E01, BF16: 0x7FC1, FP32: 0x7FC00001, np.dtype(np.uint8): 0x5A}  # NaN payloads / odd byte


# ---------------------------------------------------------------------------------------------------------------
# Independent oracles


def e4m3_reference(values, scale=1.0) -> np.ndarray:
    """uint8 E4M3fn codes of saturate(float32(v) / float32(scale)), round half to even, from float64 bit math."""
    with np.errstate(over="ignore", invalid="ignore"):
        f = (np.asarray(values).astype(np.float32) / np.float32(scale)).astype(np.float64).ravel()
    out = np.empty(f.size, dtype=np.uint8)
    for i, v in enumerate(f):
        if np.isnan(v):
            out[i] = 0x7F
            continue
        sign = 0x80 if np.signbit(v) else 0
        a = abs(v)
        if a >= 448.0:
            code = 0x7E
        elif a < 2.0**-6:  # subnormal: multiples of 2^-9; 8 * 2^-9 rounds up into the smallest normal (code 8)
            code = int(np.rint(a / 2.0**-9))
        else:
            frac, exp = np.frexp(a)  # a = frac * 2^exp, frac in [0.5, 1)
            e = exp - 1
            q = int(np.rint(a / 2.0 ** (e - 3)))  # 1.mmm as an integer in [8, 16]
            if q == 16:
                e, q = e + 1, 8
            code = min(((e + 7) << 3) | (q - 8), 0x7E)
        out[i] = sign | code
    return out.reshape(np.shape(values))


def e4m3_decode_reference(codes) -> np.ndarray:
    """float64 values of E4M3fn codes: (-1)^s * (e ? 1 + m/8 : m/8) * 2^(max(e,1) - 7); 0x7f/0xff are NaN."""
    c = np.asarray(codes).astype(np.int64)
    e, m = (c >> 3) & 15, c & 7
    mag = np.where(e == 0, m / 8.0, 1.0 + m / 8.0) * 2.0 ** (np.maximum(e, 1) - 7)
    val = np.where(c & 0x80, -mag, mag)
    return np.where((c & 0x7F) == 0x7F, np.nan, val)


def oracle_write(kv_flat, key, value, slots, *, block_size, fp8=False, k_scale=1.0, v_scale=1.0):
    """Write with SPEC section 7's flat-index formulas into ``kv_flat`` = kv_cache.reshape(2, -1) (a copy)."""
    out = kv_flat.copy()
    _, heads, head = key.shape
    x = 16 // out.itemsize
    h, d = np.meshgrid(np.arange(heads), np.arange(head), indexing="ij")
    for t, slot in enumerate(np.asarray(slots).tolist()):
        if slot < 0:
            continue
        blk, off = divmod(slot, block_size)
        kidx = ((blk * heads + h) * (head // x) + d // x) * block_size * x + off * x + d % x
        vidx = ((blk * heads + h) * head + d) * block_size + off
        k, v = key[t], value[t]
        if fp8:
            k, v = e4m3_reference(k, k_scale), e4m3_reference(v, v_scale)
        out[0][kidx] = k
        out[1][vidx] = v
    return out


def bits(a) -> np.ndarray:
    """Unsigned-integer view (NaN-safe bitwise comparison)."""
    return np.ascontiguousarray(a).view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.itemsize])


def poisoned_cache(num_blocks, block_size, heads, head, dtype):
    kv = np.empty(kvc.get_kv_cache_shape(num_blocks, block_size, heads, head), dtype=dtype)
    bits(kv).reshape(kv.shape)[...] = CANARY[np.dtype(dtype)]
    return kv


def random_slots(rng, num_tokens, num_slots, *, pad_every=5):
    """Distinct slots with every ``pad_every``-th token padding (-1)."""
    slots = rng.permutation(num_slots)[:num_tokens].astype(np.int64)
    slots[::pad_every] = -1
    return slots


# ---------------------------------------------------------------------------------------------------------------
# Shapes and views


def test_get_kv_cache_shape():
    assert PagedAttention.get_kv_cache_shape(10, 16, 8, 128) == (2, 10, 16 * 8 * 128)
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        kvc.get_kv_cache_shape(10, 0, 8, 128)
    with pytest.raises(TypeError, match="num_blocks must be an integer"):
        kvc.get_kv_cache_shape(1.5, 16, 8, 128)


@pytest.mark.parametrize("dtype, x", [(FP16, 8), (BF16, 8), (FP32, 4), (np.dtype(np.uint8), 16)])
def test_split_kv_cache_views_and_element_mapping(dtype, x):
    nb, bs, h, d = 3, 16, 2, 64
    kv = np.arange(np.prod(kvc.get_kv_cache_shape(nb, bs, h, d))).astype(dtype).reshape(2, nb, -1)
    key_cache, value_cache = PagedAttention.split_kv_cache(kv, h, d)
    assert key_cache.shape == (nb, h, d // x, bs, x) and value_cache.shape == (nb, h, d, bs)
    assert np.shares_memory(key_cache, kv[0]) and np.shares_memory(value_cache, kv[1])
    assert key_cache.base is not None and value_cache.base is not None  # views
    flat = kv.reshape(2, -1)
    blk, hh, dd, off = 2, 1, 37, 5
    assert bits(key_cache[blk, hh, dd // x, off, dd % x]) == bits(
        flat[0][((blk * h + hh) * (d // x) + dd // x) * bs * x + off * x + dd % x])
    assert bits(value_cache[blk, hh, dd, off]) == bits(flat[1][((blk * h + hh) * d + dd) * bs + off])


def test_split_kv_cache_errors():
    kv = np.zeros((2, 4, 16 * 2 * 64), np.float16)
    with pytest.raises(ValueError, match=r"head_size \(60\) must be a multiple of x = 16 // element size \(8\)"):
        kvc.split_kv_cache(np.zeros((2, 4, 16 * 2 * 60), np.float16), 2, 60)
    with pytest.raises(ValueError, match=r"must be a multiple of num_kv_heads \* head_size \(384\)"):
        kvc.split_kv_cache(kv, 3, 128)
    with pytest.raises(ValueError, match=r"kv_cache must have shape \[2, num_blocks"):
        kvc.split_kv_cache(np.zeros((3, 4, 2048), np.float16), 2, 64)
    with pytest.raises(ValueError, match="kv_cache must be 3-D"):
        kvc.split_kv_cache(kv[0], 2, 64)
    with pytest.raises(ValueError, match="kv_cache must be C-contiguous"):
        kvc.split_kv_cache(kv[:, ::2], 2, 64)


# ---------------------------------------------------------------------------------------------------------------
# fp8 E4M3


def test_e4m3_reference_hand_values():
    # Smallest subnormal 2^-9, a tie below it rounds to even (0), largest subnormal 7 * 2^-9, smallest normal 2^-6,
    # 1.0, ties between 1.0 and 1.125 round to even mantissa, saturation, -0.
    vals = np.array([2.0**-9, 2.0**-10, 3 * 2.0**-10, 7 * 2.0**-9, 2.0**-6, 1.0, 1.0625, 1.1875, 448, 464, 1e9,
                     -0.0, 0.0, -448, -np.inf, np.inf], dtype=np.float32)
    want = [0x01, 0x00, 0x02, 0x07, 0x08, 0x38, 0x38, 0x3A, 0x7E, 0x7E, 0x7E, 0x80, 0x00, 0xFE, 0xFE, 0x7E]
    assert e4m3_reference(vals).tolist() == want


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [1.0, 0.37, 3.5, 2.0**-7])
def test_fp8_quantiser_every_16bit_input(dtype, scale):
    """Every fp16 / bf16 bit pattern: saturation, subnormals, ties, +-0, +-inf, NaN."""
    x = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(dtype)
    got = kvc.float_to_fp8_e4m3(x, scale)
    want = e4m3_reference(x, scale)
    nan = np.isnan(x.astype(np.float32))
    assert ((got[nan] & 0x7F) == 0x7F).all()
    np.testing.assert_array_equal(got[~nan], want[~nan])


def test_fp8_decode_all_codes():
    codes = np.arange(256, dtype=np.uint8)
    got = kvc.fp8_e4m3_to_float(codes.reshape(16, 16)).ravel()
    assert got.dtype == np.float32 and got.shape == (256,)
    np.testing.assert_array_equal(got, e4m3_decode_reference(codes).astype(np.float32))
    assert kvc.fp8_e4m3_to_float(np.array([0x7E], np.uint8))[0] == 448.0
    with pytest.raises(TypeError, match="codes has dtype float16; supported: uint8"):
        kvc.fp8_e4m3_to_float(np.zeros(3, np.float16))


# ---------------------------------------------------------------------------------------------------------------
# Write


@pytest.mark.parametrize("dtype", [FP16, BF16, FP32])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("slot_dtype", [np.int64, np.int32])
def test_write_matches_oracle(rng, dtype, case, slot_dtype):
    t, h, d, bs, nb = case
    kv = poisoned_cache(nb, bs, h, d, dtype)
    key = rng.standard_normal((t, h, d)).astype(dtype)
    value = rng.standard_normal((t, h, d)).astype(dtype)
    slots = random_slots(rng, t, nb * bs).astype(slot_dtype)
    want = oracle_write(kv.reshape(2, -1), key, value, slots, block_size=bs)
    key_cache, value_cache = kvc.split_kv_cache(kv, h, d)
    PagedAttention.write_to_paged_cache(key, value, key_cache, value_cache, slots, "auto", 1.0, 1.0)
    np.testing.assert_array_equal(bits(kv.reshape(2, -1)), bits(want))


def test_padding_slots_leave_canaries(rng):
    """Every slot except the written ones keeps its canary, including the neighbours of each written slot."""
    t, h, d, bs, nb = 12, 2, 64, 16, 4
    kv = poisoned_cache(nb, bs, h, d, FP16)
    slots = np.array([-1, 17, -1, 18, -5, 40, -1, 0, -1, 63, -1, 31])
    key = np.random.default_rng(0).standard_normal((t, h, d)).astype(FP16)
    kc, vc = kvc.split_kv_cache(kv, h, d)
    kvc.write_to_paged_cache(key, key, kc, vc, slots)
    written = np.zeros(nb * bs, bool)
    written[slots[slots >= 0]] = True
    # [slot, h, d] views of both halves
    k_by_slot = bits(kc).transpose(0, 3, 1, 2, 4).reshape(nb * bs, h, d)
    v_by_slot = bits(vc).transpose(0, 3, 1, 2).reshape(nb * bs, h, d)
    for by_slot in (k_by_slot, v_by_slot):
        assert (by_slot[~written] == CANARY[FP16]).all()
        np.testing.assert_array_equal(by_slot[slots[slots >= 0]], bits(key[slots >= 0]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_write_fp8_matches_oracle(rng, dtype):
    t, h, d, bs, nb = 40, 2, 64, 16, 4
    kv = poisoned_cache(nb, bs, h, d, np.uint8)
    key = (rng.standard_normal((t, h, d)) * 3).astype(dtype)
    value = (rng.standard_normal((t, h, d)) * 300).astype(dtype)  # saturates at 448 * v_scale
    key[0, 0, :4] = [0.0, -0.0, 1e-3, -1e-3]  # +-0 and subnormals after scaling
    slots = random_slots(rng, t, nb * bs, pad_every=7)
    want = oracle_write(kv.reshape(2, -1), key, value, slots, block_size=bs, fp8=True, k_scale=0.5, v_scale=0.25)
    kc, vc = kvc.split_kv_cache(kv, h, d)
    assert kc.shape == (nb, h, d // 16, bs, 16)
    PagedAttention.write_to_paged_cache(key, value, kc, vc, slots, "fp8", 0.5, 0.25)
    np.testing.assert_array_equal(kv.reshape(2, -1), want)
    kv2 = poisoned_cache(nb, bs, h, d, np.uint8)
    kvc.write_to_paged_cache(key, value, *kvc.split_kv_cache(kv2, h, d), slots, "fp8_e4m3", 0.5, 0.25)
    np.testing.assert_array_equal(kv2, kv)


def test_write_strided_fused_qkv(rng):
    """key/value as slices of a fused [T, Hq + 2 Hkv, D] array, and a token stride that is not 16-byte aligned."""
    t, hq, h, d, bs, nb = 21, 4, 2, 64, 8, 4
    qkv = rng.standard_normal((t, hq + 2 * h, d)).astype(BF16)
    key, value = qkv[:, hq:hq + h], qkv[:, hq + h:]
    assert not key.flags.c_contiguous
    slots = random_slots(rng, t, nb * bs)
    kv = poisoned_cache(nb, bs, h, d, BF16)
    kvc.write_to_paged_cache(key, value, *kvc.split_kv_cache(kv, h, d), slots)
    np.testing.assert_array_equal(bits(kv.reshape(2, -1)),
                                  bits(oracle_write(poisoned_cache(nb, bs, h, d, BF16).reshape(2, -1), key, value,
                                                    slots, block_size=bs)))
    odd = rng.standard_normal((t, h * d + 3)).astype(BF16)[:, 3:].reshape(t, h, d)  # stride h*d + 3 elements
    kv = poisoned_cache(nb, bs, h, d, BF16)
    kvc.write_to_paged_cache(odd, odd, *kvc.split_kv_cache(kv, h, d), slots)
    np.testing.assert_array_equal(bits(kv.reshape(2, -1)),
                                  bits(oracle_write(poisoned_cache(nb, bs, h, d, BF16).reshape(2, -1), odd, odd,
                                                    slots, block_size=bs)))


def test_write_empty_and_all_padding(rng):
    kv = poisoned_cache(2, 16, 1, 64, FP16)
    before = kv.copy()
    kc, vc = kvc.split_kv_cache(kv, 1, 64)
    kvc.write_to_paged_cache(np.zeros((0, 1, 64), FP16), np.zeros((0, 1, 64), FP16), kc, vc, np.zeros(0, np.int64))
    x = rng.standard_normal((3, 1, 64)).astype(FP16)
    kvc.write_to_paged_cache(x, x, kc, vc, np.full(3, -1))
    np.testing.assert_array_equal(bits(kv), bits(before))


def _write_args(dtype=FP16, *, t=4, h=2, d=64, bs=16, nb=2, cache_dtype=None):
    kv = np.zeros(kvc.get_kv_cache_shape(nb, bs, h, d), cache_dtype or dtype)
    kc, vc = kvc.split_kv_cache(kv, h, d)
    key = np.ones((t, h, d), dtype)
    return key, key.copy(), kc, vc, np.arange(t, dtype=np.int64)


def test_write_errors():
    key, value, kc, vc, slots = _write_args()
    w = kvc.write_to_paged_cache
    with pytest.raises(ValueError, match="kv_cache_dtype 'fp8_e5m2' is not supported"):
        w(key, value, kc, vc, slots, "fp8_e5m2")
    with pytest.raises(ValueError, match=r"kv_cache_dtype must be one of \('auto', 'fp8', 'fp8_e4m3'\), got 'int8'"):
        w(key, value, kc, vc, slots, "int8")
    with pytest.raises(TypeError, match="key has dtype float64; supported: float16, bfloat16, float32"):
        w(key.astype(np.float64), value, kc, vc, slots)
    with pytest.raises(ValueError, match="key must be 3-D"):
        w(key[0], value, kc, vc, slots)
    with pytest.raises(ValueError, match=r"value must have shape \[4, 2, 64\], got \[4, 2, 32\]"):
        w(key, value[..., :32], kc, vc, slots)
    with pytest.raises(TypeError, match="value has dtype bfloat16; supported: float16"):
        w(key, value.astype(BF16), kc, vc, slots)
    with pytest.raises(TypeError, match="key_cache has dtype float16; supported: uint8"):
        w(key, value, kc, vc, slots, "fp8")
    with pytest.raises(TypeError, match="key_cache has dtype float16; supported: bfloat16"):
        w(key.astype(BF16), value.astype(BF16), kc, vc, slots)
    with pytest.raises(ValueError, match=r"value_cache must have shape \[2, 3, 64, 16\]"):
        w(np.ones((4, 3, 64), FP16), np.ones((4, 3, 64), FP16), kc, vc, slots)
    with pytest.raises(ValueError, match=r"key_cache must have shape \[2, 2, 8, 16, 8\]"):
        w(key, value, kc.reshape(2, 2, 4, 16, 16), vc, slots)
    with pytest.raises(ValueError, match=r"head_size \(72\) must be a multiple of x = 16 // element size \(16\)"):
        k72 = np.ones((4, 1, 72), FP16)
        w(k72, k72, np.zeros((2, 1, 4, 16, 16), np.uint8), np.zeros((2, 1, 72, 16), np.uint8), slots, "fp8")
    with pytest.raises(ValueError, match="key must be contiguous in its last two dimensions"):
        w(np.ones((4, 64, 2), FP16).transpose(0, 2, 1), value, kc, vc, slots)
    with pytest.raises(ValueError, match="value's token stride must be a non-negative"):
        w(key, value[::-1], kc, vc, slots)
    with pytest.raises(ValueError, match="key_cache must be C-contiguous"):
        w(key, value, np.zeros((2, 2, 8, 16, 8), FP16).transpose(0, 1, 2, 3, 4)[:, :, :, ::1][::-1], vc, slots)
    with pytest.raises(TypeError, match="slot_mapping must have an integer dtype, got float32"):
        w(key, value, kc, vc, slots.astype(np.float32))
    with pytest.raises(TypeError, match="slot_mapping must be int32 or int64, got int16"):
        w(key, value, kc, vc, slots.astype(np.int16))
    with pytest.raises(ValueError, match=r"slot_mapping must have one entry per token \(4\), got 3"):
        w(key, value, kc, vc, slots[:3])
    with pytest.raises(ValueError, match=r"slot_mapping\[2\] \(32\) is out of range: the cache has 2 blocks x 16 "
                                         r"= 32 slots"):
        w(key, value, kc, vc, np.array([0, 1, 32, -1]))
    kc8, vc8 = _write_args(cache_dtype=np.uint8)[2:4]
    with pytest.raises(ValueError, match=r"k_scale must be finite and > 0, got 0.0"):
        w(key, value, kc8, vc8, slots, "fp8", 0.0, 1.0)
    with pytest.raises(ValueError, match=r"v_scale must be finite and > 0, got nan"):
        w(key, value, kc8, vc8, slots, "fp8", 1.0, float("nan"))
    with pytest.raises(TypeError, match="k_scale must be a float, got str"):
        w(key, value, kc8, vc8, slots, "fp8", "1", 1.0)
    with pytest.raises(ValueError, match=r"k_scale must be a single value, got shape \[2\]"):
        w(key, value, kc8, vc8, slots, "fp8", np.ones(2), 1.0)
    w(key, value, kc8, vc8, slots, "fp8", np.float32(2.0), np.array([0.5]))  # 1-element arrays are fine
    with pytest.raises(TypeError, match="expected numpy.ndarray or cupy.ndarray, got builtins.list"):
        w(key, value, kc, vc, [0, 1, 2, 3])


def test_write_fp8_scale_range():
    """fp8 scales are limited to [2**-64, 2**64] (the CUDA quantiser's exactness range); both ends are accepted."""
    key, value, _, _, slots = _write_args()
    kc8, vc8 = _write_args(cache_dtype=np.uint8)[2:4]
    kvc.write_to_paged_cache(key, value, kc8, vc8, slots, "fp8", 2.0**-64, 2.0**64)
    np.testing.assert_array_equal(kc8[0, 0, 0, 0], e4m3_reference(key[0, 0, :16], 2.0**-64))  # saturated
    with pytest.raises(ValueError, match=r"k_scale must be in \[2\*\*-64, 2\*\*64\], got 2.7e-20"):
        kvc.write_to_paged_cache(key, value, kc8, vc8, slots, "fp8", 2.7e-20, 1.0)
    with pytest.raises(ValueError, match=r"v_scale must be in \[2\*\*-64, 2\*\*64\], got 1.9e\+19"):
        kvc.write_to_paged_cache(key, value, kc8, vc8, slots, "fp8", 1.0, 1.9e19)
    with pytest.raises(ValueError, match=r"k_scale must be in \[2\*\*-64, 2\*\*64\]"):
        kvc.gather_kv(kc8, vc8, np.array([0]), 1, kv_cache_dtype="fp8", k_scale=1e-30)


# ---------------------------------------------------------------------------------------------------------------
# gather_kv


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_gather_kv_round_trip(rng, kv_cache_dtype):
    h, d, bs, nb, seq_len = 2, 64, 16, 10, 37
    fp8 = kv_cache_dtype != "auto"
    kv = poisoned_cache(nb, bs, h, d, np.uint8 if fp8 else BF16)
    kc, vc = kvc.split_kv_cache(kv, h, d)
    table = rng.permutation(nb)[:4].astype(np.int32)
    pos = np.arange(seq_len)
    slots = table[pos // bs].astype(np.int64) * bs + pos % bs
    key = rng.standard_normal((seq_len, h, d)).astype(BF16)
    value = rng.standard_normal((seq_len, h, d)).astype(BF16)
    kvc.write_to_paged_cache(key, value, kc, vc, slots, kv_cache_dtype, 0.5, 2.0)
    k, v = kvc.gather_kv(kc, vc, table, seq_len, kv_cache_dtype=kv_cache_dtype, k_scale=0.5, v_scale=2.0)
    assert k.dtype == np.float32 and k.shape == (seq_len, h, d) and v.shape == (seq_len, h, d)
    if fp8:
        want_k = e4m3_decode_reference(e4m3_reference(key, 0.5)) * 0.5
        want_v = e4m3_decode_reference(e4m3_reference(value, 2.0)) * 2.0
    else:
        want_k, want_v = key.astype(np.float64), value.astype(np.float64)
    np.testing.assert_array_equal(k, want_k.astype(np.float32))
    np.testing.assert_array_equal(v, want_v.astype(np.float32))
    k0, _ = kvc.gather_kv(kc, vc, table, 0, kv_cache_dtype=kv_cache_dtype)
    assert k0.shape == (0, h, d)


def test_gather_kv_errors():
    kc, vc = _write_args()[2:4]
    with pytest.raises(ValueError, match=r"block_table_row has 1 entries, but seq_len 17 needs 2 blocks of 16"):
        kvc.gather_kv(kc, vc, np.array([0]), 17)
    with pytest.raises(ValueError, match=r"block_table_row\[1\] cache block id \(2\) is out of range \[0, 2\)"):
        kvc.gather_kv(kc, vc, np.array([0, 2]), 17)
    with pytest.raises(TypeError, match="key_cache has dtype float16; supported: uint8"):
        kvc.gather_kv(kc, vc, np.array([0]), 1, kv_cache_dtype="fp8")
    with pytest.raises(TypeError, match="gather_kv takes NumPy arrays; block_table_row is builtins.list"):
        kvc.gather_kv(kc, vc, [0], 1)


# ---------------------------------------------------------------------------------------------------------------
# copy_blocks and swap_blocks


def random_caches(rng, layers, nb, bs, h, d, dtype):
    return [rng.standard_normal(kvc.get_kv_cache_shape(nb, bs, h, d)).astype(dtype) for _ in range(layers)]


def oracle_copy(kv, pairs):
    out = kv.copy()
    for s, dst in pairs:
        out[0, dst] = kv[0, s]
        out[1, dst] = kv[1, s]
    return out


@pytest.mark.parametrize("dtype", [FP16, BF16, np.dtype(np.uint8)])
def test_copy_blocks_several_layers(rng, dtype):
    caches = random_caches(rng, 3, 12, 16, 2, 64, dtype)
    pairs = np.array([[0, 5], [1, 6], [7, 11], [2, 3]])
    want = [oracle_copy(kv, pairs) for kv in caches]
    PagedAttention.copy_blocks(caches, pairs)
    for got, w in zip(caches, want):
        np.testing.assert_array_equal(bits(got), bits(w))
    kvc.copy_blocks(caches, np.zeros((0, 2), np.int64))  # empty mapping: no-op
    kvc.copy_blocks([], pairs)


def test_copy_blocks_errors(rng):
    caches = random_caches(rng, 2, 8, 16, 1, 64, FP16)
    with pytest.raises(ValueError, match="block 5 is a destination more than once"):
        kvc.copy_blocks(caches, np.array([[0, 5], [1, 5]]))
    with pytest.raises(ValueError, match="block 1 is both a source and a destination"):
        kvc.copy_blocks(caches, np.array([[0, 1], [1, 2]]))
    with pytest.raises(ValueError, match=r"block_mapping\[1\] destination block id \(8\) is out of range \[0, 8\)"):
        kvc.copy_blocks(caches, np.array([[0, 1], [2, 8]]))
    with pytest.raises(ValueError, match=r"block_mapping\[0\] source block id \(-1\) is out of range"):
        kvc.copy_blocks(caches, np.array([[-1, 1]]))
    with pytest.raises(ValueError, match=r"block_mapping must have shape \[num_pairs, 2\]"):
        kvc.copy_blocks(caches, np.array([[0, 1, 2]]))
    with pytest.raises(TypeError, match="block_mapping must have an integer dtype"):
        kvc.copy_blocks(caches, np.array([[0.0, 1.0]]))
    with pytest.raises(ValueError, match=r"kv_caches\[1\] has shape \[2, 4, 1024\], but kv_caches\[0\] has"):
        kvc.copy_blocks([caches[0], caches[1][:, :4].copy()], np.array([[0, 1]]))
    with pytest.raises(TypeError, match=r"kv_caches\[1\] has dtype bfloat16; supported: float16"):
        kvc.copy_blocks([caches[0], caches[1].astype(BF16)], np.array([[0, 1]]))
    with pytest.raises(TypeError, match="kv_caches must be a list of per-layer caches"):
        kvc.copy_blocks(caches[0], np.array([[0, 1]]))
    before = [c.copy() for c in caches]
    with pytest.raises(ValueError):
        kvc.copy_blocks(caches, np.array([[0, 1], [1, 2]]))
    for c, b in zip(caches, before):  # a rejected mapping changed nothing
        np.testing.assert_array_equal(c, b)


def test_swap_blocks_host_to_host_and_runs(rng):
    src = random_caches(rng, 1, 10, 8, 2, 64, BF16)[0]
    dst = np.zeros(kvc.get_kv_cache_shape(6, 8, 2, 64), BF16)
    pairs = np.array([[2, 0], [3, 1], [4, 2], [9, 5], [0, 4], [1, 3]])
    assert kvc._runs(pairs[:, 0], pairs[:, 1]) == [(2, 0, 3), (9, 5, 1), (0, 4, 1), (1, 3, 1)]
    PagedAttention.swap_blocks(src, dst, pairs)
    for s, d in pairs:
        np.testing.assert_array_equal(bits(dst[:, d]), bits(src[:, s]))
    assert (bits(dst[:, [x for x in range(6) if x not in pairs[:, 1]]]) == 0).all()


def test_swap_blocks_errors(rng):
    src = random_caches(rng, 1, 4, 8, 2, 64, FP16)[0]
    dst = np.zeros((2, 3, 8 * 2 * 64), FP16)
    with pytest.raises(ValueError, match=r"block_mapping\[0\] destination block id \(3\) is out of range \[0, 3\)"):
        kvc.swap_blocks(src, dst, np.array([[3, 3]]))
    with pytest.raises(ValueError, match=r"block_mapping\[1\] source block id \(4\) is out of range \[0, 4\)"):
        kvc.swap_blocks(src, dst, np.array([[3, 0], [4, 1]]))
    with pytest.raises(ValueError, match="same block geometry: block sizes 1024 and 512 elements differ"):
        kvc.swap_blocks(src, np.zeros((2, 3, 512), FP16), np.array([[0, 0]]))
    with pytest.raises(TypeError, match="dst_kv_cache has dtype bfloat16; supported: float16"):
        kvc.swap_blocks(src, dst.astype(BF16), np.array([[0, 0]]))
    with pytest.raises(ValueError, match="are the same cache; use copy_blocks"):
        kvc.swap_blocks(src, src, np.array([[0, 1]]))
    with pytest.raises(ValueError, match=r"src_kv_cache must have shape \[2, num_blocks"):
        kvc.swap_blocks(src[:1], dst, np.array([[0, 1]]))


def test_empty_host_cache():
    a = kvc.empty_host_cache(kvc.get_kv_cache_shape(2, 16, 1, 64), FP16, pinned=False)
    assert isinstance(a, np.ndarray) and a.shape == (2, 2, 1024) and a.dtype == FP16
    assert kvc.kv_cache_element_dtype(BF16, "fp8") == np.uint8 and kvc.kv_cache_element_dtype(BF16) == BF16
