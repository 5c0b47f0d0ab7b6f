"""A lean reader for GGUF files: metadata as Python values, tensors dequantised by the `gguf` package.

`gguf.GGUFReader` wraps every metadata string in its own numpy view, which takes seconds for the
~100k vocabulary and merge strings of a tokenizer; this reader parses the same layout (GGUF v2/v3,
little-endian: header, key/value metadata, tensor infos, aligned tensor data) with `struct` and hands
tensor bytes to `gguf.quants.dequantize`.
"""
from __future__ import annotations

import dataclasses
import struct
from typing import Any

import gguf
import numpy as np

_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32
_SCALAR_FORMATS = {
    gguf.GGUFValueType.UINT8: "<B", gguf.GGUFValueType.INT8: "<b",
    gguf.GGUFValueType.UINT16: "<H", gguf.GGUFValueType.INT16: "<h",
    gguf.GGUFValueType.UINT32: "<I", gguf.GGUFValueType.INT32: "<i",
    gguf.GGUFValueType.FLOAT32: "<f", gguf.GGUFValueType.BOOL: "<?",
    gguf.GGUFValueType.UINT64: "<Q", gguf.GGUFValueType.INT64: "<q",
    gguf.GGUFValueType.FLOAT64: "<d",
}


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    """One tensor: its ggml type, its shape in numpy order (rows last-to-first of ggml's ne), its raw bytes."""

    qtype: gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    raw: np.ndarray

    def dequantize(self) -> np.ndarray:
        """The tensor as float32 [*shape]."""
        byte_shape = gguf.quant_shape_to_byte_shape(self.shape, self.qtype)
        return np.asarray(gguf.quants.dequantize(self.raw.reshape(byte_shape), self.qtype), dtype=np.float32)


@dataclasses.dataclass(frozen=True)
class GGUFFile:
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]


class _Cursor:
    def __init__(self, buffer: memoryview):
        self.buffer = buffer
        self.offset = 0

    def unpack(self, fmt: str) -> Any:
        value = struct.unpack_from(fmt, self.buffer, self.offset)[0]
        self.offset += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.unpack("<Q")
        text = bytes(self.buffer[self.offset:self.offset + length]).decode("utf-8")
        self.offset += length
        return text

    def value(self, value_type: int) -> Any:
        value_type = gguf.GGUFValueType(value_type)
        if value_type == gguf.GGUFValueType.STRING:
            return self.string()
        if value_type == gguf.GGUFValueType.ARRAY:
            item_type = gguf.GGUFValueType(self.unpack("<I"))
            count = self.unpack("<Q")
            if item_type in _SCALAR_FORMATS:
                fmt = _SCALAR_FORMATS[item_type]
                items = np.frombuffer(self.buffer, dtype=np.dtype(fmt), count=count, offset=self.offset)
                self.offset += items.nbytes
                return items
            return [self.value(item_type) for _ in range(count)]
        return self.unpack(_SCALAR_FORMATS[value_type])


def read_gguf(path: str) -> GGUFFile:
    """Parses a GGUF file (memory-mapped; tensor bytes are read when dequantised)."""
    data = np.memmap(path, dtype=np.uint8, mode="r")
    cursor = _Cursor(memoryview(data))
    if bytes(cursor.buffer[:4]) != _MAGIC:
        raise ValueError(f"{path!r} is not a GGUF file (its first bytes are not {_MAGIC!r}).")
    cursor.offset = 4
    version = cursor.unpack("<I")
    if version not in (2, 3):
        raise ValueError(f"{path!r} is GGUF version {version}; versions 2 and 3 are supported.")
    tensor_count = cursor.unpack("<Q")
    kv_count = cursor.unpack("<Q")
    metadata: dict[str, Any] = {}
    for _ in range(kv_count):
        key = cursor.string()
        metadata[key] = cursor.value(cursor.unpack("<I"))
    infos = []
    for _ in range(tensor_count):
        name = cursor.string()
        n_dims = cursor.unpack("<I")
        ne = [cursor.unpack("<Q") for _ in range(n_dims)]
        qtype = gguf.GGMLQuantizationType(cursor.unpack("<I"))
        infos.append((name, tuple(reversed(ne)), qtype, cursor.unpack("<Q")))
    alignment = int(metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
    data_start = -(-cursor.offset // alignment) * alignment
    tensors = {}
    for name, shape, qtype, offset in infos:
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        n_bytes = int(np.prod(shape)) // block_size * type_size
        start = data_start + offset
        tensors[name] = GGUFTensor(qtype, shape, data[start:start + n_bytes])
    return GGUFFile(metadata, tensors)
