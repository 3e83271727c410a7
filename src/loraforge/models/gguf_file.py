"""Read a GGUF file's header (metadata and tensor table) fast, and its tensors as memory-mapped arrays.

gguf-py's ``GGUFReader`` builds a numpy view per header item: on the default model (a 49,152-token
vocabulary with its merges) that is ~250,000 memmap views and ~4 s per open, and a GGUF load opened the
file up to three times. This reader walks the header with ``struct`` over one ``mmap`` (~0.1 s) and maps a
tensor's bytes only when its ``data`` is asked for. It answers what the loaders need, with gguf-py's
conventions, so the two agree value for value (``tests/models/test_gguf_file.py``):

- ``fields[key].contents()``: a Python scalar, ``str``, or list (arrays); ``value_type`` and ``item_type``
  (the array's item type, also for an empty array) as ``gguf.GGUFValueType``;
- ``tensors``: name, ``tensor_type`` (``gguf.GGMLQuantizationType``), ``shape`` (GGUF order, innermost
  first), ``n_elements``, ``n_bytes``, ``data_offset`` (absolute) and ``data``, shaped as gguf-py shapes it
  (outermost first; block types as ``uint8`` rows of bytes).

Only little-endian files (all that llama.cpp writes by default) are read; anything malformed raises
``ValueError`` naming the byte offset.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
ALIGNMENT_KEY = "general.alignment"

_SCALARS = {
    GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H", GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i", GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d",
}
_NUMPY_ITEMS = {
    GGMLQuantizationType.F16: np.float16, GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8, GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}
"""Tensor types whose ``data`` is an array of values; every other type is bytes."""


@dataclass(frozen=True)
class GGUFField:
    """One metadata key's value, already decoded."""

    name: str
    value_type: GGUFValueType
    item_type: GGUFValueType | None
    value: object

    def contents(self):
        return self.value


@dataclass
class GGUFTensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: np.ndarray
    n_elements: int
    n_bytes: int
    data_offset: int
    _buffer: mmap.mmap

    @cached_property
    def data(self) -> np.ndarray:
        dims = tuple(int(n) for n in reversed(self.shape.tolist()))
        item = _NUMPY_ITEMS.get(self.tensor_type)
        if item is not None:
            return np.frombuffer(self._buffer, item, self.n_elements, self.data_offset).reshape(dims)
        block_size, type_size = GGML_QUANT_SIZES[self.tensor_type]
        rows = (*dims[:-1], dims[-1] // block_size * type_size)
        return np.frombuffer(self._buffer, np.uint8, self.n_bytes, self.data_offset).reshape(rows)


class GGUFFile:
    """The parsed header of the GGUF file at ``path``; see the module docstring.

    Raises:
        ValueError: not a GGUF file, a big-endian or unknown version, or a header that runs past the end of
            the file or holds an unknown type (the message names the byte offset).
        OSError: the file can't be opened.
    """

    def __init__(self, path: str | os.PathLike):
        with open(path, "rb") as handle:
            self._buffer = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(handle.fileno()).st_size else b""
        self._at = 0
        try:
            self._parse()
        except (struct.error, IndexError, UnicodeDecodeError) as err:
            raise ValueError(f"the GGUF header is cut short or corrupt near byte {self._at} ({err})") from None

    def _parse(self) -> None:
        if bytes(self._buffer[:4]) != GGUF_MAGIC:
            raise ValueError("the file does not start with the GGUF magic")
        self._at = 4
        version, tensor_count, field_count = self._unpack("<IQQ")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (read little-endian) is not supported; expected 2 or 3")
        self.fields: dict[str, GGUFField] = {}
        for _ in range(field_count):
            name = self._string()
            value_type = self._value_type()
            item_type = None
            if value_type == GGUFValueType.ARRAY:
                item_type = self._value_type()
                value = self._array(item_type)
            else:
                value = self._value(value_type)
            self.fields[name] = GGUFField(name, value_type, item_type, value)
        infos = [self._tensor_info() for _ in range(tensor_count)]
        alignment = self.fields[ALIGNMENT_KEY].value if ALIGNMENT_KEY in self.fields else DEFAULT_ALIGNMENT
        start = -(-self._at // alignment) * alignment
        self.tensors: list[GGUFTensor] = []
        names = set()
        for name, dims, tensor_type, offset in infos:
            if name in names:
                raise ValueError(f"tensor {name} appears twice")
            names.add(name)
            block_size, type_size = GGML_QUANT_SIZES[tensor_type]
            n_elements = int(np.prod(dims))
            self.tensors.append(GGUFTensor(name, tensor_type, dims, n_elements, n_elements * type_size // block_size,
                                           start + offset, self._buffer))

    def _unpack(self, fmt: str) -> tuple:
        values = struct.unpack_from(fmt, self._buffer, self._at)
        self._at += struct.calcsize(fmt)
        return values

    def _string(self) -> str:
        (length,) = self._unpack("<Q")
        if self._at + length > len(self._buffer):
            raise ValueError(f"a string of {length} bytes at byte {self._at} runs past the end of the file")
        text = str(self._buffer[self._at:self._at + length], "utf-8")
        self._at += length
        return text

    def _value_type(self) -> GGUFValueType:
        (raw,) = self._unpack("<I")
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise ValueError(f"unknown GGUF value type {raw} at byte {self._at - 4}") from None

    def _value(self, value_type: GGUFValueType):
        if value_type == GGUFValueType.STRING:
            return self._string()
        if value_type == GGUFValueType.ARRAY:
            return self._array(self._value_type())
        return self._unpack("<" + _SCALARS[value_type])[0]

    def _array(self, item_type: GGUFValueType) -> list:
        (count,) = self._unpack("<Q")
        if item_type in _SCALARS:
            fmt = "<" + _SCALARS[item_type]
            size = struct.calcsize(fmt) * count
            if self._at + size > len(self._buffer):
                raise ValueError(f"an array of {count} items at byte {self._at} runs past the end of the file")
            values = np.frombuffer(self._buffer, np.dtype(fmt), count, self._at).tolist()
            self._at += size
            return values
        if item_type == GGUFValueType.STRING:
            return [self._string() for _ in range(count)]
        return [self._array(self._value_type()) for _ in range(count)]

    def _tensor_info(self) -> tuple[str, np.ndarray, GGMLQuantizationType, int]:
        name = self._string()
        (n_dims,) = self._unpack("<I")
        dims = np.array(self._unpack(f"<{n_dims}Q"), dtype=np.uint64)
        raw_type, offset = self._unpack("<IQ")
        try:
            tensor_type = GGMLQuantizationType(raw_type)
        except ValueError:
            raise ValueError(f"tensor {name} has unknown type {raw_type}") from None
        return name, dims, tensor_type, offset
