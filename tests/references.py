"""Test references (PEFT, bitsandbytes, gguf, llama-cpp-python, ...) imported so that CI can't skip them.

Outside CI a missing reference skips its tests with the install hint; with ``CI=true`` it fails them.
"""

import importlib
import os

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(module: str):
    """Import ``module`` or skip (fail in CI), naming the test extra that provides it."""
    try:
        return importlib.import_module(module)
    except Exception as err:  # a broken install (ImportError, OSError from a native library) counts as missing
        message = (f"test reference {module!r} cannot be imported ({type(err).__name__}: {err}); "
                   f"install the test extras: bash scripts/setup.sh test")
        if IN_CI:
            pytest.fail(message, pytrace=False)
        pytest.skip(message, allow_module_level=True)


def require_built(native_library):
    """``native_library``'s compiled module (``loraforge.native.LOWBIT``, ``DECODE_OPS``), or skip (fail in CI) when
    it could not be built, with the reason."""
    module = native_library.library()
    if module is None:
        message = f"{native_library.what} could not be built: {native_library.status()}"
        if IN_CI:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return module
