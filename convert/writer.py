"""A streaming safetensors writer: every output tensor's shape and dtype is known before any data is read, so
the shards and their headers are laid out first and each block of rows is then written straight to its place
(`os.pwrite`). Memory stays at one block however large the tensors, and per-expert source tensors land in
their rows of the stacked tensor wherever in the source they come from."""

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "U32": 4, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
            "U16": 2, "U8": 1, "BOOL": 1}
SAFETENSORS_DTYPE = {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.uint32: "U32",
                     mx.int64: "I64", mx.int32: "I32", mx.int16: "I16", mx.int8: "I8", mx.uint64: "U64",
                     mx.uint16: "U16", mx.uint8: "U8", mx.bool_: "BOOL"}
INDEX_NAME = "model.safetensors.index.json"


@dataclass
class OutputTensor:
    name: str
    dtype: str
    shape: tuple
    file: str = ""
    offset: int = 0  # absolute, in `file`
    written: int = field(default=0, repr=False)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]

    @property
    def row_bytes(self) -> int:
        return (self.shape[-1] if self.shape else 1) * ITEMSIZE[self.dtype]


def parse_size(text) -> int:
    """'5GB', '500MB', '200KiB', or a number of bytes."""
    if isinstance(text, int):
        return text
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    value = str(text).strip().lower()
    for unit, factor in units.items():
        if value.endswith(unit):
            return int(float(value[: -len(unit)]) * factor)
    return int(value)


def plan_shards(groups: list[list[OutputTensor]], max_shard_size: int) -> list[list[OutputTensor]]:
    """Pack groups of tensors (a quantised weight with its scales and biases stays together) in order into
    shards of at most max_shard_size bytes; a group larger than that gets a shard of its own."""
    shards, current, size = [], [], 0
    for group in groups:
        group_size = sum(t.nbytes for t in group)
        if current and size + group_size > max_shard_size:
            shards.append(current)
            current, size = [], 0
        current.extend(group)
        size += group_size
    if current:
        shards.append(current)
    return shards


def write_at(fd: int, data, offset: int):
    """The one place bytes reach the disk (tests replace it to simulate a full disk)."""
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


class ShardedWriter:
    """Lays out the shards in `directory`, writes their headers on open, then takes rows of any tensor in any
    order; `close` checks that every byte of every tensor was written and writes the index."""

    def __init__(self, directory: Path, groups: list[list[OutputTensor]], max_shard_size: int):
        self.directory = Path(directory)
        shards = plan_shards(groups, max_shard_size)
        self.tensors = {t.name: t for shard in shards for t in shard}
        if len(self.tensors) != sum(len(s) for s in shards):
            raise ValueError("duplicate output tensor names")
        self.headers, self.fds = {}, {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            # Largest items first keeps every tensor aligned to its element size (safetensors allows no padding).
            shard = sorted(shard, key=lambda t: -ITEMSIZE[t.dtype])
            header, position = {"__metadata__": {"format": "mlx"}}, 0
            for tensor in shard:
                header[tensor.name] = {"dtype": tensor.dtype, "shape": list(tensor.shape),
                                       "data_offsets": [position, position + tensor.nbytes]}
                tensor.file = name
                position += tensor.nbytes
            encoded = json.dumps(header, separators=(",", ":")).encode()
            encoded += b" " * (-(8 + len(encoded)) % 8)
            for tensor in shard:
                tensor.offset = 8 + len(encoded) + header[tensor.name]["data_offsets"][0]
            self.headers[name] = len(encoded).to_bytes(8, "little") + encoded

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values()) + sum(len(h) for h in self.headers.values())

    def open(self):
        for name, header in self.headers.items():
            fd = os.open(self.directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            self.fds[name] = fd
            write_at(fd, header, 0)

    def write_rows(self, name: str, first_row: int, array: mx.array) -> int:
        """Write `array` (rows of tensor `name`, in its dtype) starting at row `first_row`; returns the bytes."""
        tensor = self.tensors[name]
        if SAFETENSORS_DTYPE[array.dtype] != tensor.dtype:
            raise ValueError(f"{name}: got {array.dtype}, planned {tensor.dtype}")
        if array.dtype == mx.bfloat16:
            array = array.view(mx.uint16)
        mx.eval(array)
        data = memoryview(array)
        if first_row * tensor.row_bytes + data.nbytes > tensor.nbytes:
            raise ValueError(f"{name}: rows from {first_row} overflow the tensor {tensor.shape}")
        write_at(self.fds[tensor.file], data, tensor.offset + first_row * tensor.row_bytes)
        tensor.written += data.nbytes
        return data.nbytes

    def close(self):
        incomplete = [f"{t.name} ({t.written} of {t.nbytes} bytes)" for t in self.tensors.values()
                      if t.written != t.nbytes]
        if incomplete:
            raise RuntimeError(f"output tensors not fully written: {', '.join(incomplete[:8])}")
        for fd in self.fds.values():
            os.fsync(fd)  # a full disk can surface only here; it must fail before the output is renamed
        self.abort()
        index = {"metadata": {"total_size": sum(t.nbytes for t in self.tensors.values())},
                 "weight_map": {t.name: t.file for t in sorted(self.tensors.values(), key=lambda t: t.name)}}
        (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2))

    def abort(self):
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}
