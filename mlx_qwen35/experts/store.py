"""Where routed expert weights live on disk, read one expert at a time with positional reads.

Two stores share one interface (`layers`, `num_experts`, `components(layer)`, `record_nbytes(layer)`,
`read(layer, expert)` -> {name: numpy array}):

- `ExpertStore`: the dedicated layout written by `write_expert_store`. Per MoE layer one file
  `layer_{i:03d}.experts` holding every expert as one record (gate_up_proj, down_proj and, when quantised,
  their _scales/_biases, each 64-byte aligned inside the record); records start at multiples of 4096 bytes,
  so one expert is one aligned read. `manifest.json` gives per layer the components (name, dtype, shape,
  offset in the record), the record offsets, a CRC32 per record, the SHA-256 of the source bytes, and a
  fingerprint of the source tensors (names, dtypes, shapes and sampled bytes) that is checked on open, so a
  store beside the wrong checkpoint is rejected without reading every expert.
- `CheckpointExpertStore`: the same reads straight from the checkpoint's safetensors (one read per
  component instead of one per expert, no CRC); used when no store was written.
"""

import argparse
import hashlib
import json
import math
import os
import re
import sys
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import ModelConfig
from ..loading import (
    CheckpointError,
    check_safetensors_file,
    resolve_path,
    safetensors_files,
    sanitize_key,
)

STORE_DIR = "expert_store"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
ALIGN = 4096
COMPONENT_ALIGN = 64
FINGERPRINT_SAMPLES = 8  # sampled 4 KiB windows per source tensor
SAMPLE_BYTES = 4096
COMPONENTS = ("gate_up_proj", "down_proj", "gate_up_proj_scales", "gate_up_proj_biases", "down_proj_scales",
              "down_proj_biases")
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "U32": 4, "U8": 1, "I32": 4}
NUMPY = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "U32": np.uint32,
         "U8": np.uint8, "I32": np.int32}
FUSED_KEY = re.compile(r"^model\.language_model\.layers\.(\d+)\.mlp\.experts\.(" + "|".join(COMPONENTS) + r")$")
PER_EXPERT_KEY = re.compile(r"^model\.language_model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")


class ExpertStoreError(ValueError):
    pass


class ExpertReadError(OSError):
    """Reading one expert failed (I/O error, short read or checksum mismatch)."""

    def __init__(self, layer: int, expert: int, file, reason: str):
        super().__init__(f"expert store: layer {layer} expert {expert} ({file}): {reason}")
        self.layer, self.expert = layer, expert


def _align(n: int, a: int) -> int:
    return -(-n // a) * a


@dataclass
class Part:
    """Bytes of one source tensor that hold one component of one expert."""

    file: Path
    offset: int
    nbytes: int


@dataclass
class SourceComponent:
    """One component of every expert of a layer: shape and dtype per expert, and where each expert's bytes are
    (one part for a fused [E, ...] tensor; gate then up for the per-expert HF layout, concatenated on axis 0)."""

    name: str
    dtype: str
    shape: tuple
    tensors: list  # [(file, data offset, full shape, safetensors name)]
    fused: bool

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]

    def parts(self, expert: int) -> list:
        if self.fused:
            file, offset, _, _ = self.tensors[0]
            return [Part(file, offset + expert * self.nbytes, self.nbytes)]
        file_offsets = self.tensors[expert]
        return [Part(file, offset, math.prod(shape) * ITEMSIZE[self.dtype]) for file, offset, shape, _ in file_offsets]


def checkpoint_components(path: Path) -> tuple[dict, int]:
    """{layer: [SourceComponent]} for every MoE layer of a checkpoint (HF or converted), and the expert count."""
    config = ModelConfig.from_path(path)
    text = config.text_config
    if not text.is_moe:
        raise ExpertStoreError(f"{path} is not a MoE checkpoint ({config.model_type})")
    if (config.raw.get("quantization_config") or {}).get("quant_method") == "fp8":
        raise ExpertStoreError(f"{path} holds FP8 experts; convert it first (python -m convert)")
    E = text.num_experts
    fused, per_expert = {}, {}
    for file in safetensors_files(path):
        header = check_safetensors_file(file)
        with open(file, "rb") as f:
            data_start = 8 + int.from_bytes(f.read(8), "little")
        for raw_name, entry in header.items():
            if raw_name == "__metadata__":
                continue
            name = sanitize_key(raw_name, config)
            if name is None:
                continue
            where = (file, data_start + entry["data_offsets"][0], tuple(entry["shape"]), raw_name, entry["dtype"])
            if m := FUSED_KEY.match(name):
                fused.setdefault(int(m[1]), {})[m[2]] = where
            elif m := PER_EXPERT_KEY.match(name):
                per_expert.setdefault(int(m[1]), {})[(int(m[2]), m[3])] = where
    layers = {}
    for layer in sorted(set(fused) | set(per_expert)):
        comps = []
        if layer in fused:
            for name in COMPONENTS:
                if name not in fused[layer]:
                    continue
                file, offset, shape, raw_name, dtype = fused[layer][name]
                if shape[0] != E or dtype not in ITEMSIZE:
                    raise ExpertStoreError(f"{raw_name}: shape {shape} {dtype} is not [{E}, ...] in a known dtype")
                comps.append(SourceComponent(name, dtype, shape[1:], [(file, offset, shape, raw_name)], True))
        else:
            found = per_expert[layer]
            missing = [(e, p) for e in range(E) for p in ("gate", "up", "down") if (e, p) not in found]
            if missing:
                raise ExpertStoreError(f"layer {layer}: checkpoint lacks expert tensors {missing[:4]}")
            for name, projections in (("gate_up_proj", ("gate", "up")), ("down_proj", ("down",))):
                per = [[found[(e, p)][:4] for p in projections] for e in range(E)]
                first = [found[(0, p)] for p in projections]
                shape = (sum(f[2][0] for f in first), *first[0][2][1:])
                comps.append(SourceComponent(name, first[0][4], shape, per, False))
        if {c.name for c in comps} & {"gate_up_proj", "down_proj"} != {"gate_up_proj", "down_proj"}:
            raise ExpertStoreError(f"layer {layer}: checkpoint lacks gate_up_proj or down_proj")
        layers[layer] = comps
    if not layers:
        raise ExpertStoreError(f"{path} holds no routed expert tensors")
    return layers, E


def _pread_exact(pread, fd, nbytes: int, offset: int) -> bytes:
    data = pread(fd, nbytes, offset)
    if len(data) != nbytes:
        raise OSError(f"short read: {len(data)} of {nbytes} bytes at offset {offset} (file truncated?)")
    return data


def _as_array(data, offset: int, dtype: str, shape: tuple) -> np.ndarray:
    count = math.prod(shape)
    return np.frombuffer(data, dtype=NUMPY[dtype], count=count, offset=offset).reshape(shape)


def source_fingerprint(components: list, num_experts: int, pread=os.pread) -> str:
    """SHA-256 over the layer's source tensor names, dtypes, shapes and sampled bytes: cheap enough to check on
    every open, and any re-trained or re-quantised checkpoint differs in its samples."""
    digest = hashlib.sha256()
    for comp in components:
        for file, offset, shape, raw_name in (comp.tensors if comp.fused else comp.tensors[0]):
            nbytes = math.prod(shape) * ITEMSIZE[comp.dtype]
            digest.update(f"{raw_name}|{comp.dtype}|{list(shape)}|".encode())
            fd = os.open(file, os.O_RDONLY)
            try:
                for i in range(FINGERPRINT_SAMPLES):
                    spread = (nbytes - SAMPLE_BYTES) * i // max(1, FINGERPRINT_SAMPLES - 1)
                    start = spread if nbytes > SAMPLE_BYTES else 0
                    digest.update(_pread_exact(pread, fd, min(SAMPLE_BYTES, nbytes), offset + start))
            finally:
                os.close(fd)
        if not comp.fused:  # the per-expert layout: also sample the last expert's tensors
            for file, offset, shape, raw_name in comp.tensors[num_experts - 1]:
                digest.update(raw_name.encode())
                fd = os.open(file, os.O_RDONLY)
                try:
                    digest.update(_pread_exact(pread, fd, min(SAMPLE_BYTES, math.prod(shape) * ITEMSIZE[comp.dtype]),
                                               offset))
                finally:
                    os.close(fd)
    return digest.hexdigest()


class _FileHandles:
    """One descriptor per file, shared by the reader threads (pread takes no file position)."""

    def __init__(self):
        self.fds, self.lock = {}, threading.Lock()

    def get(self, file) -> int:
        with self.lock:
            fd = self.fds.get(file)
            if fd is None:
                fd = self.fds[file] = os.open(file, os.O_RDONLY)
            return fd

    def close(self):
        with self.lock:
            for fd in self.fds.values():
                os.close(fd)
            self.fds.clear()


class CheckpointExpertStore:
    """Experts read straight from the checkpoint's safetensors, one positional read per component."""

    def __init__(self, checkpoint):
        self.path = resolve_path(checkpoint)
        self._components, self.num_experts = checkpoint_components(self.path)
        self.layers = sorted(self._components)
        self._files = _FileHandles()
        self.pread = os.pread  # replaceable, e.g. to inject faults in tests

    def components(self, layer: int) -> list:
        """[(name, safetensors dtype, per-expert shape)]"""
        return [(c.name, c.dtype, tuple(c.shape)) for c in self._components[layer]]

    def record_nbytes(self, layer: int) -> int:
        return sum(c.nbytes for c in self._components[layer])

    def read(self, layer: int, expert: int) -> dict:
        if not 0 <= expert < self.num_experts:
            raise ExpertReadError(layer, expert, self.path, f"no such expert (the layer has {self.num_experts})")
        out = {}
        for comp in self._components[layer]:
            chunks = []
            for part in comp.parts(expert):
                try:
                    chunks.append(_pread_exact(self.pread, self._files.get(part.file), part.nbytes, part.offset))
                except OSError as error:
                    raise ExpertReadError(layer, expert, part.file, f"{comp.name}: {error}") from error
            out[comp.name] = _as_array(b"".join(chunks) if len(chunks) > 1 else chunks[0], 0, comp.dtype, comp.shape)
        return out

    def close(self):
        self._files.close()


class ExpertStore:
    """The dedicated store written by `write_expert_store`: one aligned read and a CRC32 check per expert."""

    def __init__(self, directory, checkpoint=None, verify_crc: bool = True):
        self.directory = Path(directory)
        manifest_file = self.directory / MANIFEST
        if not manifest_file.exists():
            raise ExpertStoreError(f"no expert store at {self.directory} ({MANIFEST} is missing)")
        try:
            self.manifest = json.loads(manifest_file.read_text())
        except json.JSONDecodeError as error:
            raise ExpertStoreError(f"{manifest_file} is corrupt: {error}") from error
        if self.manifest.get("version") != FORMAT_VERSION:
            raise ExpertStoreError(f"{manifest_file}: format version {self.manifest.get('version')} "
                                   f"(this code reads {FORMAT_VERSION}); rebuild the store")
        self.num_experts = self.manifest["num_experts"]
        self._layers = {int(k): v for k, v in self.manifest["layers"].items()}
        self.layers = sorted(self._layers)
        self.verify_crc = verify_crc
        self.pread = os.pread
        self._files = _FileHandles()
        for layer, entry in self._layers.items():
            file = self.directory / entry["file"]
            needed = entry["offsets"][-1] + entry["record_bytes"]
            if not file.exists():
                raise ExpertStoreError(f"expert store {self.directory}: file {entry['file']} of layer {layer} "
                                       f"(experts 0-{self.num_experts - 1}) is missing")
            size = file.stat().st_size
            if size < needed:
                first_bad = next(e for e, o in enumerate(entry["offsets"]) if o + entry["record_bytes"] > size)
                raise ExpertStoreError(f"expert store {self.directory}: {entry['file']} is truncated ({size} of "
                                       f"{needed} bytes): layer {layer} experts {first_bad}-{self.num_experts - 1} "
                                       f"are cut off")
        if checkpoint is not None:
            self.check_matches(checkpoint)

    def check_matches(self, checkpoint):
        """Raise ExpertStoreError unless this store was built from `checkpoint` (fingerprints per layer)."""
        components, num_experts = checkpoint_components(resolve_path(checkpoint))
        if sorted(components) != self.layers or num_experts != self.num_experts:
            raise ExpertStoreError(f"expert store {self.directory} does not match {checkpoint}: it holds layers "
                                   f"{self.layers} x {self.num_experts} experts, the checkpoint "
                                   f"{sorted(components)} x {num_experts}")
        for layer in self.layers:
            if source_fingerprint(components[layer], num_experts) != self._layers[layer]["fingerprint"]:
                raise ExpertStoreError(f"expert store {self.directory} does not match {checkpoint}: layer {layer}'s "
                                       f"source hash differs (built from another checkpoint?); rebuild it with "
                                       f"write_expert_store")

    def components(self, layer: int) -> list:
        return [(c["name"], c["dtype"], tuple(c["shape"])) for c in self._layers[layer]["components"]]

    def record_nbytes(self, layer: int) -> int:
        return sum(c["nbytes"] for c in self._layers[layer]["components"])

    def read(self, layer: int, expert: int) -> dict:
        entry = self._layers[layer]
        file = self.directory / entry["file"]
        if not 0 <= expert < self.num_experts:
            raise ExpertReadError(layer, expert, file, f"no such expert (the layer has {self.num_experts})")
        try:
            data = _pread_exact(self.pread, self._files.get(file), entry["record_bytes"], entry["offsets"][expert])
        except OSError as error:
            raise ExpertReadError(layer, expert, file, str(error)) from error
        if self.verify_crc and zlib.crc32(data) != entry["crc32"][expert]:
            raise ExpertReadError(layer, expert, file, "checksum mismatch (the store file is corrupt; rebuild it)")
        return {c["name"]: _as_array(data, c["offset"], c["dtype"], tuple(c["shape"])) for c in entry["components"]}

    def verify(self, checkpoint) -> None:
        """Full check: every record's CRC, and the SHA-256 of every source byte (reads both in full)."""
        components, _ = checkpoint_components(resolve_path(checkpoint))
        source = CheckpointExpertStore(checkpoint)
        try:
            for layer in self.layers:
                digest = hashlib.sha256()
                for expert in range(self.num_experts):
                    self.read(layer, expert)
                    arrays = source.read(layer, expert)
                    for comp in components[layer]:
                        digest.update(arrays[comp.name].tobytes())
                if digest.hexdigest() != self._layers[layer]["source_sha256"]:
                    raise ExpertStoreError(f"layer {layer}: source SHA-256 differs from the store's")
        finally:
            source.close()

    def close(self):
        self._files.close()


def open_store(checkpoint):
    """The dedicated store beside the checkpoint when there is one (checked against it), else reads straight
    from the checkpoint's safetensors."""
    path = resolve_path(checkpoint)
    if (path / STORE_DIR / MANIFEST).exists():
        return ExpertStore(path / STORE_DIR, checkpoint=path)
    return CheckpointExpertStore(path)


def write_expert_store(checkpoint, output=None, log=None) -> Path:
    """Build the dedicated store from a converted (or HF float) checkpoint, one layer and one expert at a
    time (memory stays near one expert). Written into `output` (default: CHECKPOINT/expert_store) via a
    temporary directory, so a failed run leaves no half store behind."""
    path = resolve_path(checkpoint)
    output = Path(output) if output is not None else path / STORE_DIR
    source = CheckpointExpertStore(path)
    temporary = output.parent / f".{output.name}.partial-{os.getpid()}"
    temporary.mkdir(parents=True, exist_ok=False)
    start, written = time.perf_counter(), 0
    try:
        layers = {}
        for layer in source.layers:
            comps, offset = [], 0
            for name, dtype, shape in source.components(layer):
                nbytes = math.prod(shape) * ITEMSIZE[dtype]
                comps.append({"name": name, "dtype": dtype, "shape": list(shape), "offset": offset, "nbytes": nbytes})
                offset = _align(offset + nbytes, COMPONENT_ALIGN)
            record_bytes = comps[-1]["offset"] + comps[-1]["nbytes"]
            stride = _align(record_bytes, ALIGN)
            file_name = f"layer_{layer:03d}.experts"
            digest, crcs, offsets = hashlib.sha256(), [], []
            with open(temporary / file_name, "wb") as f:
                for expert in range(source.num_experts):
                    arrays = source.read(layer, expert)
                    record = bytearray(stride)
                    for comp in comps:
                        raw = arrays[comp["name"]].tobytes()
                        digest.update(raw)
                        record[comp["offset"]: comp["offset"] + len(raw)] = raw
                    crcs.append(zlib.crc32(memoryview(record)[:record_bytes]))
                    offsets.append(expert * stride)
                    f.write(record)
                    written += stride
            layers[str(layer)] = {
                "file": file_name, "record_bytes": record_bytes, "stride": stride, "components": comps,
                "offsets": offsets, "crc32": crcs, "source_sha256": digest.hexdigest(),
                "fingerprint": source_fingerprint(source._components[layer], source.num_experts)}
            if log:
                log(f"layer {layer}: {source.num_experts} experts x {stride} bytes")
        manifest = {"version": FORMAT_VERSION, "alignment": ALIGN, "num_experts": source.num_experts,
                    "checkpoint": str(path), "layers": layers}
        (temporary / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if output.exists():
            import shutil

            shutil.rmtree(output)
        temporary.rename(output)
    except BaseException:
        import shutil

        shutil.rmtree(temporary, ignore_errors=True)
        raise
    finally:
        source.close()
    if log:
        log(f"wrote {output}: {written / 1e9:.3f} GB in {time.perf_counter() - start:.1f} s")
    return output


def main(argv=None) -> int:
    """`mlx-qwen35 convert --expert-store` hook: build the expert store of a checkpoint directory."""
    parser = argparse.ArgumentParser(prog="mlx-qwen35-expert-store", description=write_expert_store.__doc__)
    parser.add_argument("checkpoint", help="converted (or Hugging Face float) checkpoint directory")
    parser.add_argument("--output", help="store directory (default: CHECKPOINT/expert_store)")
    args = parser.parse_args(argv)
    try:
        write_expert_store(args.checkpoint, args.output, log=print)
    except (ExpertStoreError, CheckpointError, FileNotFoundError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0
