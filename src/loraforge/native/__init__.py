"""Our C++ CPU code, compiled on first use: the low-bit matmul (``lowbit.cpp``, used by ``quant.kernels``), the
fused dequantizer (``dequant.cpp``, used by the weight formats through ``quant.native_dequant``) and the serving
engine's fused decode ops (``decode_ops.cpp``, used by ``serve.runner``).

Each source is compiled with ``torch.utils.cpp_extension`` (the system C++ compiler and ninja) into
``$LORAFORGE_CACHE/kernels/<stem>_<hash>/``, the hash covering the source, the flags, the torch version and the
Python ABI, so a changed source or torch builds anew and a built library is reused by every later process. The
build runs under a file lock (two processes never build at once) in a staging folder renamed into place when
complete (``utils.atomic``), so no half-built library ever sits under the final name. No ``-march=native``: the
code picks its instruction set at run time (AVX512-VNNI / AVX512 / AVX2 / portable), so a cached build stays valid
on any x86-64 machine, and other architectures build the portable code.

Every library is compiled with ``-fopenmp`` (``OPENMP``): ``at::parallel_for`` is inline code that splits work
over torch's OpenMP threads only where it is compiled with OpenMP, and runs it all on the calling thread otherwise.
It is linked against the OpenMP runtime torch itself has loaded (:func:`torch_openmp_runtime`: pip wheels bundle
one, sometimes under a renamed soname such as ``libgomp-<hash>.so.1``), never a second copy from the system: two
runtimes would mean two thread pools competing for the cores, one of them deaf to ``torch.set_num_threads``. Where
no runtime is found (no ``/proc``: macOS, whose compiler may lack ``-fopenmp``), the libraries are built without
OpenMP and run on the calling thread.

If a build fails (no compiler, no ninja), :meth:`NativeLibrary.library` returns None after ONE warning that names
what is missing and what runs instead (torch's ops), and :meth:`NativeLibrary.status` says so.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import re
import shutil
import sys
import sysconfig
import time
import warnings
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import torch


@dataclass
class NativeLibrary:
    """One C++ source of this package, built on first use (see the module docstring)."""

    source: str
    stem: str
    cflags: tuple[str, ...]
    what: str
    fallback: str
    """What runs when the library can't be built, for the warning."""
    _state: dict = field(default_factory=dict, repr=False)
    """``library``: the loaded module or None; ``reason``: why it is None; ``build_seconds``: a build's wall time."""

    def library(self):
        """The compiled module, built on first call; None when it can't be built, after one ``RuntimeWarning``."""
        if "library" not in self._state:
            try:
                start = time.perf_counter()
                module, built = build_extension(Path(__file__).with_name(self.source), self.stem, list(self.cflags),
                                                self.what)
                self._state["library"] = module
                if built:
                    self._state["build_seconds"] = time.perf_counter() - start
            except Exception as err:  # noqa: BLE001 - compiler errors, a missing tool, a broken cache: all mean "none"
                reason = " ".join(str(err).split())[-600:] or type(err).__name__
                self._state.update(library=None, reason=reason)
                warnings.warn(
                    f"loraforge: {self.what} could not be built ({reason}). {self.fallback}. To build it, install a "
                    f"C++ compiler (g++ or clang++, e.g. `apt-get install g++`) and ninja (`pip install ninja`).",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return self._state["library"]

    def status(self) -> str:
        """``built`` (with the instruction set, where the library reports one), or why it is unavailable."""
        lib = self.library()
        if lib is None:
            return f"unavailable ({self._state['reason']})"
        return f"built, {lib.available_isas()[0]}" if hasattr(lib, "available_isas") else "built"

    def build_dir(self) -> Path:
        """Where this source's build lives: ``$LORAFORGE_CACHE/kernels/<stem>_<hash>``."""
        return _build_dir(_name(Path(__file__).with_name(self.source), self.stem, list(self.cflags)))

    def reset(self) -> None:
        """Forget the loaded module or the failure, so that the next call builds or loads again (tests)."""
        self._state.clear()


LOWBIT = NativeLibrary("lowbit.cpp", "loraforge_lowbit", ("-O3",), "the native low-bit CPU kernel",
                       "Quantized layers use torch's int4 kernel instead (slower decode)")
"""``mm``, ``quantize_rows``, ``available_isas``: int8-activation products with stored 4-/8-bit codes."""

DECODE_OPS = NativeLibrary("decode_ops.cpp", "loraforge_decode_ops", ("-O3", "-fopenmp-simd"),
                           "the native decode ops", "The serving engine runs torch's ops instead (slower decode)")
"""``rms_norm``, ``silu_mul``, ``rope_``, ``kv_write``, ``paged_decode_attention``, ``decode_attention_step``: a decode
step's small ops."""

DEQUANT = NativeLibrary("dequant.cpp", "loraforge_dequant", ("-O3", "-ffp-contract=off"),
                        "the native dequantizer", "Quantized layers are decoded with torch's ops instead (slower)")
"""``decode``, ``double_dequantize``, ``available_isas``: a quantized weight's tile decoded in one pass
(``quant.native_dequant``), bit-identical to the torch decode; ``-ffp-contract=off`` keeps products and sums rounded
apart, as torch rounds them."""


OPENMP = "-fopenmp"
"""Compile flag of every library (see the module docstring)."""


@cache
def torch_openmp_runtime() -> str | None:
    """The OpenMP runtime library torch has loaded in this process (GNU ``libgomp*``, Intel ``libiomp5``, LLVM
    ``libomp``), read from ``/proc/self/maps`` once (torch loads it on import); None where there is none or no
    ``/proc``."""
    maps = Path("/proc/self/maps")
    if not maps.is_file():
        return None
    loaded = {line.split(maxsplit=5)[-1].strip() for line in maps.read_text().splitlines() if line.count(" ") >= 5}
    runtimes = sorted(path for path in loaded if _OPENMP_RUNTIME.match(os.path.basename(path)))
    in_torch = [path for path in runtimes if path.startswith(os.path.dirname(torch.__file__))]
    return (in_torch or runtimes or [None])[0]


_OPENMP_RUNTIME = re.compile(r"lib(gomp|iomp5|omp)([-.].*)?\.so(\.\d+)*$")


def build_extension(source: Path, stem: str, cflags: list[str], what: str):
    """``(module, built)``: the pybind11 extension compiled from one C++ ``source`` with ``cflags``, from the cache,
    or built there now (``built`` True) under a file lock, in a staging folder renamed into place when complete.

    Raises:
        RuntimeError: no C++ compiler or no ninja (named), or the compiler's own error.
    """
    from loraforge.utils.atomic import atomic_dir

    name = _name(source, stem, cflags)
    target = _build_dir(name)
    library_file = target / f"{name}.so"
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if library_file.is_file():
            return _import(name, library_file), False
        _check_tools()
        from torch.utils import cpp_extension

        print(f"loraforge: building {what} into {target} (first use only, ~30 s)", file=sys.stderr, flush=True)
        runtime = torch_openmp_runtime()
        with atomic_dir(target) as staging:
            module = cpp_extension.load(name, [str(source)], extra_cflags=[*cflags, *([OPENMP] if runtime else [])],
                                        extra_ldflags=[runtime] if runtime else [], build_directory=str(staging),
                                        verbose=False)
        return module, True


def _build_dir(name: str) -> Path:
    from loraforge.models.sources import cache_root

    return cache_root() / "kernels" / name


def _name(source: Path, stem: str, cflags: list[str]) -> str:
    key = hashlib.sha256(source.read_bytes())
    runtime = torch_openmp_runtime()
    key.update(f"{cflags}|{OPENMP}|{runtime}|{torch.__version__}|{sys.implementation.cache_tag}|"
               f"{sysconfig.get_platform()}".encode())
    return f"{stem}_{key.hexdigest()[:16]}"


def _import(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check_tools() -> None:
    """Name the missing tool up front (cpp_extension's own errors are long): a C++ compiler and ninja, taking the
    ``ninja`` PyPI package's binary when none is on PATH."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler: {compiler!r} is not on PATH")
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            raise RuntimeError("ninja is not installed") from None
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
