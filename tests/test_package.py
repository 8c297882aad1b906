"""Package-level behaviour: import without CuPy, the command line, the kernel registry."""

import subprocess
import sys

import cubsattn
from cubsattn import _kernels
from cubsattn.__main__ import main


def test_import_without_cupy():
    code = ("import sys; sys.modules['cupy'] = None; import cubsattn; "
            "assert cubsattn.gpu_available() is False; print(cubsattn.__all__)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "BlockSparseLayout" in res.stdout


def test_public_names():
    for name in cubsattn.__all__:
        assert getattr(cubsattn, name) is not None, name
        assert getattr(cubsattn, name).__doc__, f"{name} has no docstring"


def test_demo_on_cpu(capsys):
    assert main(["demo", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "check: OK" in out and "head 0" in out and "sparsity" in out


def test_info(capsys):
    assert main(["info"]) == 0
    assert "cubsattn 0.1.0" in capsys.readouterr().out


def test_kernel_registry_lists_sources():
    names = {s.filename for s in _kernels.all_sources()}
    assert "debug.cu" in names
    for source in _kernels.all_sources():
        assert (_kernels.CUDA_SRC / source.filename).is_file()
        assert source.name_expressions, source.filename
        text = _kernels.source_text(source.filename)
        assert text.startswith(f'#line 1 "{source.filename}"')
