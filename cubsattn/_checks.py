"""One error vocabulary for every public entry point.

Every check runs on the host before any kernel launch. Messages name the argument, the rule and the values, e.g.
``ValueError: num_heads (30) must be a multiple of num_kv_heads (8)``.
"""

from __future__ import annotations

import numbers

import ml_dtypes
import numpy as np

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
FLOAT16 = np.dtype(np.float16)
FLOAT32 = np.dtype(np.float32)
#: dtypes of q/k/v accepted by the attention entry points (fp32 only on the NumPy backend).
ATTENTION_DTYPES = (FLOAT16, BFLOAT16, FLOAT32)
GPU_ATTENTION_DTYPES = (FLOAT16, BFLOAT16)


def dtype_name(dtype) -> str:
    return "bfloat16" if np.dtype(dtype) == BFLOAT16 else np.dtype(dtype).name


def check_int(name: str, value, *, minimum: int | None = None) -> int:
    """An integer (not bool) >= ``minimum``; returns it as a Python int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} ({value!r})")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_divisible(name: str, value: int, divisor_name: str, divisor: int) -> None:
    if value % divisor != 0:
        raise ValueError(f"{name} ({value}) must be a multiple of {divisor_name} ({divisor})")


_DLPACK_CUDA = 2  # DLDeviceType kDLCUDA


def as_array(a):
    """Zero-copy CuPy view of a foreign GPU array (torch, JAX, ...: CUDA ``__dlpack__`` or
    ``__cuda_array_interface__``); NumPy/CuPy arrays, None and anything else are returned unchanged (the checks then
    reject what is not an array)."""
    if a is None or isinstance(a, np.ndarray) or type(a).__module__.startswith("cupy"):
        return a
    if hasattr(a, "__dlpack__") and hasattr(a, "__dlpack_device__") and a.__dlpack_device__()[0] == _DLPACK_CUDA:
        import cupy

        return cupy.from_dlpack(a)
    if hasattr(a, "__cuda_array_interface__"):
        import cupy

        return cupy.asarray(a)
    return a


def array_module(*arrays):
    """``numpy`` or ``cupy``, whichever module all non-None ``arrays`` belong to.

    Raises TypeError when NumPy and CuPy arrays are mixed or an argument is not an array.
    """
    kinds = set()
    for a in arrays:
        if a is None:
            continue
        if isinstance(a, np.ndarray):
            kinds.add("numpy")
        elif type(a).__module__.startswith("cupy"):
            kinds.add("cupy")
        else:
            raise TypeError(f"expected numpy.ndarray or cupy.ndarray, got {type(a).__module__}.{type(a).__name__} "
                            f"(GPU arrays exposing CUDA __dlpack__ or __cuda_array_interface__ are accepted too)")
    if len(kinds) > 1:
        raise TypeError("arguments mix NumPy (host) and CuPy (device) arrays; move them to one side first")
    if kinds == {"cupy"}:
        import cupy

        return cupy
    return np


def check_array(name: str, a, *, ndim: int | None = None, dtypes=None, shape=None) -> None:
    """Check ndim, dtype and shape of an array; ``shape`` entries that are None are not checked."""
    if not hasattr(a, "shape") or not hasattr(a, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(a).__name__}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {list(a.shape)}")
    if dtypes is not None and np.dtype(a.dtype) not in tuple(np.dtype(d) for d in dtypes):
        allowed = ", ".join(dtype_name(d) for d in dtypes)
        raise TypeError(f"{name} has dtype {dtype_name(a.dtype)}; supported: {allowed}")
    if shape is not None:
        if len(shape) != a.ndim or any(s is not None and s != t for s, t in zip(shape, a.shape)):
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{name} must have shape {want}, got {list(a.shape)}")


def check_int_array(name: str, a, *, ndim: int = 1) -> None:
    check_array(name, a, ndim=ndim)
    if not np.issubdtype(np.dtype(a.dtype), np.integer):
        raise TypeError(f"{name} must have an integer dtype, got {dtype_name(a.dtype)}")


def to_host(a) -> np.ndarray:
    """A NumPy copy of a (small) NumPy or CuPy array; synchronises for CuPy."""
    if isinstance(a, np.ndarray):
        return a
    return a.get()


def check_cu_seqlens(name: str, cu_host: np.ndarray, num_tokens: int) -> np.ndarray:
    """Validate a cumulative-length vector ``[batch + 1]``: starts at 0, non-decreasing, ends at num_tokens."""
    cu = np.asarray(cu_host).astype(np.int64)
    if cu.ndim != 1 or cu.shape[0] < 2:
        raise ValueError(f"{name} must be 1-D with batch + 1 >= 2 entries, got shape {list(cu.shape)}")
    if cu[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {int(cu[0])}")
    steps = np.diff(cu)
    if (steps < 0).any():
        i = int(np.argmax(steps < 0))
        raise ValueError(f"{name} must be non-decreasing, but {name}[{i + 1}] ({int(cu[i + 1])}) < "
                         f"{name}[{i}] ({int(cu[i])})")
    if cu[-1] != num_tokens:
        raise ValueError(f"{name}[-1] ({int(cu[-1])}) must equal the number of tokens ({num_tokens})")
    return cu
