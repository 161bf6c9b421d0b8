"""A bounded reader of a GGUF file's header: its key-value metadata and its tensor infos.

Design choices:
- Every count and length the file declares is checked against the bytes that remain before anything
  is read by it, so a 69-byte file that declares 2**62 array entries is refused at once (gguf's
  `GGUFReader` walks such an array element by element, for good).
- Arrays of arrays are refused (llama.cpp reads none), and one array holds at most
  `MAX_ARRAY_ITEMS` entries: a vocabulary's tokens, merges and token types are 10^5-10^6 each.
- Numeric arrays are read whole; string arrays are skipped (a model's shape is in scalars and
  per-layer numbers; the vocabulary is not needed), which reads a real model's header in a tenth of
  a second instead of several seconds.
- The GGML types' block sizes come from the `gguf` package, llama.cpp's own table.
- The file is memory-mapped; no page of tensor data is touched. Byte-swapped (big-endian) files are
  read as `GGUFReader` reads them.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from hybrimoe.errors import ModelError, UserError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
MAX_ARRAY_ITEMS = 1 << 22
MAX_DIMS = 4  # GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32
_STRING, _ARRAY = 8, 9
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]  # GGUF's order, innermost first
    type_name: str  # the GGML type, e.g. "Q4_K"
    n_bytes: int
    data_offset: int  # from the start of the file


@dataclass(frozen=True)
class GgufHeader:
    fields: dict[str, object]  # scalars, strings and numeric arrays (as lists); string arrays are None
    tensors: tuple[TensorInfo, ...]


def read_header(path: Path) -> GgufHeader:
    """The header of the GGUF file at `path` (a regular file); a `ModelError` naming what is wrong
    when it is not a GGUF, is truncated (a tensor's data past the file's end, too) or declares more
    than it holds."""
    try:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    except ImportError:
        raise UserError("reading a .gguf model needs the gguf package: pip install 'hybrimoe[gguf]'") from None

    size_bytes = path.stat().st_size
    if size_bytes < len(MAGIC) + 4 + 16:
        raise ModelError(f"{path}: not a GGUF file ({size_bytes} bytes)")
    with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:4] != MAGIC:
            raise ModelError(f"{path}: not a GGUF file (no GGUF magic)")
        cursor = _Cursor(data, path, "<")
        cursor.offset = 4
        version = cursor.take("I")
        if version & 0xFFFF == 0:  # written on a machine of the other byte order
            cursor.order = ">"
            version = struct.unpack(">I", struct.pack("<I", version))[0]
        if version not in VERSIONS:
            raise ModelError(f"{path}: GGUF version {version}; hybrimoe reads versions {VERSIONS[0]}-{VERSIONS[-1]}")
        n_tensors, n_fields = cursor.take("Q"), cursor.take("Q")
        fields: dict[str, object] = {}
        for _ in range(n_fields):  # each field takes bytes, so a false count ends at the file's end
            key = cursor.string("a metadata key")
            if key in fields:
                raise ModelError(f"{path}: the GGUF header has the key {key!r} twice")
            fields[key] = cursor.value(cursor.take("I"), key)
        infos = [_tensor_info(cursor) for _ in range(n_tensors)]
        alignment = fields.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment < 1 or alignment & (alignment - 1):
            raise ModelError(f"{path}: the GGUF header's general.alignment is {alignment!r}, not a power of two")
        data_start = -(-cursor.offset // alignment) * alignment
    tensors, names = [], set()
    for name, dims, raw_type, offset in infos:
        if name in names:
            raise ModelError(f"{path}: the GGUF header has tensor {name!r} twice")
        names.add(name)
        try:
            kind = GGMLQuantizationType(raw_type)
        except ValueError:
            raise ModelError(f"{path}: tensor {name} has unknown GGML type {raw_type}") from None
        block_size, type_bytes = GGML_QUANT_SIZES[kind]
        tensor = TensorInfo(name, dims, kind.name, math.prod(dims) // block_size * type_bytes, data_start + offset)
        if tensor.data_offset + tensor.n_bytes > size_bytes:
            raise ModelError(f"{path}: truncated: tensor {name} ends past the end of the file")
        tensors.append(tensor)
    return GgufHeader(fields, tuple(tensors))


def _tensor_info(cursor: _Cursor) -> tuple[str, tuple[int, ...], int, int]:
    name = cursor.string("a tensor name")
    n_dims = cursor.take("I")
    if n_dims > MAX_DIMS:
        raise ModelError(f"{cursor.path}: tensor {name} declares {n_dims} dimensions; GGML has at most {MAX_DIMS}")
    dims = tuple(cursor.take_array("Q", n_dims, name))
    return name, dims, cursor.take("I", name), cursor.take("Q", name)


class _Cursor:
    """Reads the header's values in order, refusing any that would run past the file's end."""

    def __init__(self, data: mmap.mmap, path: Path, order: str):
        self.data, self.path, self.order, self.offset = data, path, order, 0

    def _room(self, n_bytes: int, what: str) -> None:
        if n_bytes > len(self.data) - self.offset:
            raise ModelError(f"{self.path}: truncated: {what} runs past the end of the file")

    def take(self, fmt: str, what: str = "the header"):
        """One value of struct format `fmt`."""
        return self.take_array(fmt, 1, what)[0]

    def take_array(self, fmt: str, count: int, what: str) -> list:
        layout = struct.Struct(f"{self.order}{count}{fmt}")
        self._room(layout.size, what)
        values = layout.unpack_from(self.data, self.offset)
        self.offset += layout.size
        return list(values)

    def string(self, what: str) -> str:
        n_bytes = self.take("Q", what)
        self._room(n_bytes, what)
        raw = self.data[self.offset:self.offset + n_bytes]
        self.offset += n_bytes
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise ModelError(f"{self.path}: {what} is not UTF-8 text") from None

    def value(self, value_type: int, key: str):
        """A field's value: a number, a string, a list of numbers, or None for an array of strings."""
        if value_type in _SCALAR_FORMATS:
            return self.take(_SCALAR_FORMATS[value_type], key)
        if value_type == _STRING:
            return self.string(key)
        if value_type != _ARRAY:
            raise ModelError(f"{self.path}: {key} has unknown GGUF value type {value_type}")
        item_type, count = self.take("I", key), self.take("Q", key)
        if count > MAX_ARRAY_ITEMS:
            raise ModelError(f"{self.path}: {key} declares {count} entries; hybrimoe reads at most {MAX_ARRAY_ITEMS}")
        if item_type == _STRING:
            length = struct.Struct(f"{self.order}Q")
            for _ in range(count):  # skipped, each entry its length and its bytes
                self._room(length.size, key)
                n_bytes = length.unpack_from(self.data, self.offset)[0]
                self._room(length.size + n_bytes, key)
                self.offset += length.size + n_bytes
            return None
        if item_type not in _SCALAR_FORMATS:
            raise ModelError(f"{self.path}: {key} is an array of GGUF value type {item_type}; llama.cpp reads "
                             "arrays of numbers and of strings only")
        return self.take_array(_SCALAR_FORMATS[item_type], count, key)
