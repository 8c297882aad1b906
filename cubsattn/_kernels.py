"""The only module that touches ``cupy.RawModule`` and NVRTC.

Each CUDA source file in ``cuda_src/`` is registered once, with the template instantiations the library uses, by the
op module that launches it (``KernelSource`` below). Modules are compiled lazily, once per (file, device) and process;
CuPy's on-disk kernel cache (``~/.cupy/kernel_cache``) makes later processes fast. ``.ci/compile_kernels.py`` compiles
the very same sources, names and options through ``cupy.cuda.nvrtc`` on a machine without a GPU.
"""

from __future__ import annotations

import functools
import importlib
import sys
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np


def _find_cuda_src() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "cuda_src", Path(sys.prefix) / "share" / "cubsattn" / "cuda_src"):
        if (candidate / "common.cuh").is_file():
            return candidate
    raise FileNotFoundError(f"cubsattn's cuda_src/ not found next to {here} or under {sys.prefix}/share/cubsattn")


CUDA_SRC = _find_cuda_src()

#: C++ type of each supported element dtype, as written in template name expressions.
CTYPE = {
    np.dtype(np.float16): "__half",
    np.dtype(ml_dtypes.bfloat16): "__nv_bfloat16",
}

#: The op modules that register kernel sources (imported by ``all_sources``).
_OP_MODULES = ("cubsattn._debug_cuda", "cubsattn._prefill_cuda", "cubsattn._cache_cuda", "cubsattn._decode_cuda",
               "cubsattn._prefill_sm90")

#: CuPy appends these to every NVRTC compile; the CI compile check adds them too.
CUPY_IMPLICIT_OPTIONS = ("-ftz=true",)


@dataclass(frozen=True)
class KernelSource:
    """One ``cuda_src/`` file and every template instantiation the library launches from it.

    ``archs`` lists the targets CI compiles it for (``"sm_90a"`` for Hopper-only code); ``min_cc`` is the lowest
    compute capability (major*10 + minor) the library loads it on.
    """

    filename: str
    name_expressions: tuple[str, ...]
    archs: tuple[str, ...] = ("sm_80", "sm_90")
    min_cc: int = 80
    extra_options: tuple[str, ...] = ()


_SOURCES: dict[str, KernelSource] = {}


def register(source: KernelSource) -> KernelSource:
    """Record ``source`` (called at import time by the op module that owns the file)."""
    _SOURCES[source.filename] = source
    return source


def all_sources() -> list[KernelSource]:
    """Every registered source, importing the op modules first."""
    for name in _OP_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:  # an op module not written yet
            if e.name != name:
                raise
    return [_SOURCES[k] for k in sorted(_SOURCES)]


@functools.cache
def cuda_include_dirs() -> tuple[str, ...]:
    """Directories holding the CUDA runtime headers (cuda_fp16.h, cuda_bf16.h) for NVRTC.

    NVRTC has no default search path; the headers come from the ``nvidia-cuda-runtime*`` wheel (found through
    ``cuda.pathfinder``, a CuPy dependency) or from a CUDA toolkit (CUDA_PATH, /usr/local/cuda).
    """
    dirs = []
    try:
        from cuda.pathfinder import find_nvidia_header_directory

        found = find_nvidia_header_directory("cudart")
        if found:
            dirs.append(str(found))
    except Exception:  # pathfinder missing or too old: fall back to toolkit locations
        pass
    if not dirs:
        import os

        for root in (os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
            if root and (Path(root) / "include" / "cuda_fp16.h").is_file():
                dirs.append(str(Path(root) / "include"))
                break
    return tuple(dirs)


def compile_options(source: KernelSource) -> tuple[str, ...]:
    """NVRTC options for ``source`` (without the target architecture)."""
    includes = tuple(f"-I{d}" for d in (str(CUDA_SRC), *cuda_include_dirs()))
    return ("--std=c++17", *includes, *source.extra_options)


def source_text(filename: str) -> str:
    """The code handed to NVRTC: the file, with a #line so errors cite ``prefill.cu:123``."""
    return f'#line 1 "{filename}"\n' + (CUDA_SRC / filename).read_text()


@functools.cache
def _module(filename: str, device_id: int):
    import cupy

    source = _SOURCES[filename]
    options = compile_options(source)
    # CuPy appends -arch=sm_XY of the device and cannot name an arch-specific target (sm_90a: wgmma, setmaxnreg).
    # Given both, NVRTC builds the sm_XYa superset, so an arch-specific source names its target explicitly.
    specific = [a for a in source.archs if a.endswith("a")]
    if specific:
        options += (f"--gpu-architecture={specific[0]}",)
    return cupy.RawModule(code=source_text(filename), options=options,
                          name_expressions=list(source.name_expressions))


#: (filename, name, device) -> dynamic shared-memory limit already set on that function.
_SMEM_LIMITS: dict[tuple[str, str, int], int] = {}


def get_function(filename: str, name: str, *, dynamic_smem: int = 0):
    """The compiled kernel ``name`` of ``filename`` on the current device (compiled on first use).

    ``dynamic_smem``: bytes of dynamic shared memory the launches will use; above 48 KB the function's limit must be
    raised first (``max_dynamic_shared_size_bytes``), which is done here once per function and device.
    """
    import cupy

    source = _SOURCES[filename]
    if name not in source.name_expressions:
        raise KeyError(f"{name!r} is not a registered instantiation of {filename}")
    device = cupy.cuda.Device()
    cc = int(device.compute_capability)
    if cc < source.min_cc:
        raise RuntimeError(f"{filename} needs compute capability >= {source.min_cc / 10:.1f}; "
                           f"device {device.id} has {cc / 10:.1f}")
    function = _module(filename, device.id).get_function(name)
    key = (filename, name, device.id)
    if dynamic_smem > _SMEM_LIMITS.get(key, 0):
        function.max_dynamic_shared_size_bytes = dynamic_smem
        _SMEM_LIMITS[key] = dynamic_smem
    return function


def ctype(dtype) -> str:
    """C++ element type of ``dtype`` (fp16/bf16)."""
    return CTYPE[np.dtype(dtype)]


def num_sms() -> int:
    """Streaming multiprocessors of the current device."""
    import cupy

    return _device_attribute(cupy.cuda.Device().id, "MultiProcessorCount")


@functools.cache
def _device_attribute(device_id: int, name: str) -> int:
    import cupy

    return int(cupy.cuda.Device(device_id).attributes[name])
