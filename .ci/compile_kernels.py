"""Compile every cuda_src/ kernel through NVRTC, exactly as the library does, on a machine without a GPU.

CuPy's own compile path needs a device to pick the architecture, so this calls ``cupy.cuda.nvrtc`` directly with the
library's sources, template instantiations (name expressions) and options, for each target architecture.
"""

from __future__ import annotations

import sys
import time

from cupy_backends.cuda.libs import nvrtc

from cubsattn import _kernels


def compile_one(source: _kernels.KernelSource, arch: str) -> None:
    prog = nvrtc.createProgram(_kernels.source_text(source.filename), source.filename, [], [])
    try:
        for name in source.name_expressions:
            nvrtc.addNameExpression(prog, name)
        options = [*_kernels.compile_options(source), *_kernels.CUPY_IMPLICIT_OPTIONS, f"--gpu-architecture={arch}"]
        try:
            nvrtc.compileProgram(prog, options)
        except nvrtc.NVRTCError as e:
            raise RuntimeError(f"{source.filename} [{arch}] failed:\n{nvrtc.getProgramLog(prog)}") from e
        for name in source.name_expressions:
            nvrtc.getLoweredName(prog, name)  # every instantiation must exist
        if not nvrtc.getCUBIN(prog):
            raise RuntimeError(f"{source.filename} [{arch}]: empty cubin")
    finally:
        nvrtc.destroyProgram(prog)


def main() -> int:
    print(f"NVRTC {nvrtc.getVersion()}; headers from {_kernels.cuda_include_dirs()}")
    sources = _kernels.all_sources()
    if not sources:
        print("no kernel sources registered")
        return 1
    failures = 0
    for source in sources:
        for arch in source.archs:
            t = time.perf_counter()
            try:
                compile_one(source, arch)
                print(f"ok   {source.filename:14s} {arch:7s} {len(source.name_expressions):3d} instantiations "
                      f"{time.perf_counter() - t:6.1f} s")
            except RuntimeError as e:
                failures += 1
                print(f"FAIL {e}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
