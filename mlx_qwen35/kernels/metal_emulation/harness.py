"""Run a kernel source written for `mx.fast.metal_kernel` on the CPU: generate the translation unit
MLX would hand the Metal compiler (same signature, same template instantiation), compile it as C++
against metal_shim.h, and run the whole grid with every thread of a threadgroup as a fiber. With
`dialect="cuda"`, the same for `mx.fast.cuda_kernel`: the translation unit MLX's CUDA backend builds (pointer
inputs, template arguments as constants in the body), against cuda_shim.h on the same fibers.

    outputs = run_kernel(name, input_names, output_names, source, header, inputs=[...],
                         template=[...], grid=(x, y, z), threadgroup=(x, y, z),
                         output_shapes=[...], output_dtypes=[...])

Inputs are NumPy arrays, mx.arrays or Python scalars (int -> int32, float -> float32, bool -> bool, as
MLX converts them). Outputs come back as NumPy arrays; bfloat16 outputs as float32. Outputs start as
all-ones bytes (NaN) unless `init_value` is given, so elements a kernel forgets to write show up.
"""

import hashlib
import os
import re
import subprocess
import tempfile
from pathlib import Path

import numpy as np

SHIM = Path(__file__).with_name("metal_shim.h")

# Dtype name -> (type string in the generated signature, NumPy storage dtype).
TYPES = {
    "float32": ("float", np.float32), "float16": ("float16_t", np.float16),
    "bfloat16": ("bfloat16_t", np.uint16), "bool": ("bool", np.bool_),
    "int8": ("int8_t", np.int8), "int16": ("int16_t", np.int16), "int32": ("int32_t", np.int32),
    "int64": ("int64_t", np.int64), "uint8": ("uint8_t", np.uint8), "uint16": ("uint16_t", np.uint16),
    "uint32": ("uint32_t", np.uint32), "uint64": ("uint64_t", np.uint64),
}
ATTRIBUTES = [  # the thread-position attributes MLX declares when the source names them
    ("dispatch_quadgroups_per_threadgroup", "uint"), ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"), ("grid_origin", "uint3"), ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"), ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"), ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"), ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"), ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"), ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"), ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"), ("threads_per_simdgroup", "uint"), ("threads_per_threadgroup", "uint3"),
]
MAX_CONSTANT_ARRAY_SIZE = 8
# `threadgroup T name[N]...;` declared in a kernel: shared by the threadgroup, so a function static.
THREADGROUP_ARRAY = re.compile(r"\bthreadgroup\s+([A-Za-z_][\w:<>, ]*?)\s+([A-Za-z_]\w*)\s*((?:\[[^\]]+\])+)\s*;")


def dtype_name(dtype) -> str:
    name = str(dtype).replace("mlx.core.", "")
    name = {"bool_": "bool", "float": "float32"}.get(name, name)
    if name not in TYPES:
        raise ValueError(f"unsupported dtype {dtype} for the Metal emulation")
    return name


def as_buffer(x):
    """(dtype name, NumPy array in storage layout, is scalar) for one kernel input."""
    if isinstance(x, bool):
        return "bool", np.array(x), True
    if isinstance(x, int):
        return "int32", np.array(x, np.int32), True
    if isinstance(x, float):
        return "float32", np.array(x, np.float32), True
    if type(x).__module__.startswith("mlx"):
        import mlx.core as mx

        name = dtype_name(x.dtype)
        arr = np.array(x.view(mx.uint16) if name == "bfloat16" else x)
        return name, np.ascontiguousarray(arr), x.ndim == 0
    arr = np.ascontiguousarray(x)
    return dtype_name(arr.dtype), arr, arr.ndim == 0


def bf16_to_f32(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x):
    """Round to nearest even, as the shim's bfloat16_t does (for building bfloat16 test inputs)."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def template_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return TYPES[dtype_name(value)][0]


def translation_unit(name, input_names, output_names, source, header, in_types, template):
    """The C++ file: MLX's generated kernel (signature from the dtypes and which of name_shape,
    name_strides, name_ndim and the attributes the source mentions) plus a main that feeds it."""
    params, args = [], []
    for i, (nm, (dt, ndim, size)) in enumerate(zip(input_names, in_types)):
        space = "constant" if size < MAX_CONSTANT_ARRAY_SIZE else "device"
        ref = "&" if ndim == 0 else "*"
        params.append(f"  const {space} {TYPES[dt][0]}{ref} {nm} [[buffer({len(params)})]]")
        args.append(f"*({TYPES[dt][0]}*)buf[{len(args)}]" if ndim == 0 else f"({TYPES[dt][0]}*)buf[{len(args)}]")
        if ndim == 0:
            continue
        for suffix, ctype, scalar in (("_shape", "int", False), ("_strides", "int64_t", False),
                                      ("_ndim", "int", True)):
            if nm + suffix in source:
                ref = "&" if scalar else "*"
                params.append(f"  const constant {ctype}{ref} {nm}{suffix} [[buffer({len(params)})]]")
                args.append(f"*({ctype}*)buf[{len(args)}]" if scalar else f"({ctype}*)buf[{len(args)}]")
    for nm, dt in zip(output_names, template["__outputs__"]):
        params.append(f"  device {TYPES[dt][0]}* {nm} [[buffer({len(params)})]]")
        args.append(f"({TYPES[dt][0]}*)buf[{len(args)}]")
    attrs = [(a, t) for a, t in ATTRIBUTES if a in source]
    params += [f"  {t} {a} [[{a}]]" for a, t in attrs]
    args += [f"id.{a}" for a, _ in attrs]
    targs = [(k, v) for k, v in template.items() if k != "__outputs__"]
    func = f"custom_kernel_{name}"
    tdecl = ""
    if targs:
        kinds = ["bool" if isinstance(v, bool) else "int" if isinstance(v, int) else "typename" for _, v in targs]
        tdecl = "template <" + ", ".join(f"{kd} {k}" for kd, (k, _) in zip(kinds, targs)) + ">\n"
        call = func + "<" + ", ".join(template_value(v) for _, v in targs) + ">"
    else:
        call = func
    kernel = f"{header}\n{tdecl}[[kernel]] void {func}(\n" + ",\n".join(params) + f") {{\n{source}\n}}\n"
    kernel = THREADGROUP_ARRAY.sub(r"static \1 \2\3; mtl_emu::tg_poison(&\2, sizeof(\2));", kernel)
    return f"""#include "metal_shim.h"
{kernel}
#undef device
#undef constant
#undef thread
#undef threadgroup
#include "harness_main.h"
static void run_thread(void* ctx, int) {{
  auto& id = *mtl_emu::current_ids();
  void** buf = static_cast<void**>(ctx);
  {call}({", ".join(args)});
}}
int main(int argc, char** argv) {{ return mtl_emu::harness_main(argc, argv, &run_thread); }}
"""


def cuda_translation_unit(name, input_names, output_names, source, header, in_types, template):
    """The C++ file for a CUDA kernel: MLX's generated `__global__` function (every input a pointer, shapes
    when the source names them, template arguments as constants at the top of the body) plus a main."""
    params, args = [], []
    for nm, (dt, ndim, _) in zip(input_names, in_types):
        params.append(f"    const {TYPES[dt][0]}* {nm}")
        args.append(f"({TYPES[dt][0]}*)buf[{len(args)}]")
        if ndim == 0:
            continue
        for suffix, ctype in (("_shape", "Shape"), ("_strides", "const int64_t*"), ("_ndim", "int")):
            if nm + suffix in source:
                params.append(f"    const {ctype} {nm}{suffix}")
                args.append(f"*(int*)buf[{len(args)}]" if suffix == "_ndim" else f"({ctype})buf[{len(args)}]")
    for nm, dt in zip(output_names, template["__outputs__"]):
        params.append(f"    {TYPES[dt][0]}* {nm}")
        args.append(f"({TYPES[dt][0]}*)buf[{len(args)}]")
    constants = "".join(f"  constexpr {'bool' if isinstance(v, bool) else 'int'} {k} = {template_value(v)};\n"
                        if isinstance(v, (bool, int)) else f"  using {k} = {template_value(v)};\n"
                        for k, v in template.items() if k != "__outputs__")
    func = f"custom_kernel_{name}"
    kernel = (f"{header}\nnamespace mlx::core::cu {{\n__global__ void {func}(\n" + ",\n".join(params)
              + f") {{\n{constants}\n{source}\n}}\n}}  // namespace mlx::core::cu\n")
    kernel = THREADGROUP_ARRAY.sub(r"static \1 \2\3; mtl_emu::tg_poison(&\2, sizeof(\2));", kernel)
    return f"""#include "cuda_shim.h"
{kernel}
static void run_thread(void* ctx, int) {{
  void** buf = static_cast<void**>(ctx);
  mlx::core::cu::{func}({", ".join(args)});
}}
int main(int argc, char** argv) {{ return mtl_emu::harness_main(argc, argv, &run_thread); }}
"""


def cache_dir() -> Path:
    d = Path(os.environ.get("MLX_QWEN35_METAL_EMU_CACHE",
                            Path(tempfile.gettempdir()) / f"mlx_qwen35_metal_emu_{os.getuid()}"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def compile_tu(code: str) -> Path:
    here = Path(__file__).parent
    shims = "".join((here / f).read_text() for f in ("metal_shim.h", "harness_main.h", "cuda_shim.h"))
    key = hashlib.sha256((code + shims).encode()).hexdigest()[:24]
    exe = cache_dir() / f"kernel_{key}"
    if exe.exists():
        return exe
    src = exe.with_suffix(".cpp")
    src.write_text(code)
    tmp = exe.with_name(exe.name + f".tmp{os.getpid()}")
    cmd = [os.environ.get("CXX", "g++"), "-std=c++20", "-O2", "-w", "-fno-strict-aliasing",
           f"-I{here}", str(src), "-o", str(tmp)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"the kernel does not compile against the emulation shim:\n{proc.stderr[-6000:]}")
    os.replace(tmp, exe)  # atomic, so concurrent test workers never run a half-written binary
    return exe


def write_blob(path, arrays):
    with open(path, "wb") as f:
        f.write(np.array([len(arrays)], np.uint64).tobytes())
        f.write(np.array([a.nbytes for a in arrays], np.uint64).tobytes())
        f.writelines(a.tobytes() for a in arrays)


def run_kernel(name, input_names, output_names, source, header="", *, inputs, grid, threadgroup,
               output_shapes, output_dtypes, template=(), init_value=None, timeout=300, dialect="metal"):
    if len(inputs) != len(input_names) or len(output_shapes) != len(output_names) \
            or len(output_dtypes) != len(output_names):
        raise ValueError("inputs/outputs do not match input_names/output_names")
    if any(t < 1 for t in threadgroup) or np.prod(threadgroup) > 1024:
        raise ValueError(f"threadgroup {threadgroup} must be positive with at most 1024 threads")
    bufs = [as_buffer(x) for x in inputs]
    out_names = [dtype_name(d) for d in output_dtypes]
    in_types = [(dt, arr.ndim, arr.size) for dt, arr, _ in bufs]
    tmpl = dict(template)
    tmpl["__outputs__"] = out_names
    if dialect not in ("metal", "cuda"):
        raise ValueError(f"dialect must be 'metal' or 'cuda', not {dialect!r}")
    if dialect == "cuda" and any(g % t for g, t in zip(grid, threadgroup)):
        raise ValueError(f"grid {grid} is not whole blocks of {threadgroup}: CUDA would run the extra threads")
    build = cuda_translation_unit if dialect == "cuda" else translation_unit
    exe = compile_tu(build(name, input_names, output_names, source, header, in_types, tmpl))

    data = []
    for nm, (dt, arr, scalar) in zip(input_names, bufs):
        data.append(arr)
        if scalar:
            continue
        if nm + "_shape" in source:
            data.append(np.array(arr.shape, np.int32))
        if nm + "_strides" in source:
            data.append(np.array([s // arr.itemsize for s in arr.strides], np.int64))
        if nm + "_ndim" in source:
            data.append(np.array(arr.ndim, np.int32))
    outs = []
    for shape, dt in zip(output_shapes, out_names):
        storage = TYPES[dt][1]
        if init_value is None:
            fill = 0 if storage == np.bool_ else 0xFF  # a bool byte must stay 0 or 1
            o = np.full(int(np.prod(shape)) * np.dtype(storage).itemsize, fill, np.uint8).view(storage)
        elif dt == "bfloat16":
            o = np.full(int(np.prod(shape)), f32_to_bf16(np.float32(init_value)), np.uint16)
        else:
            o = np.full(int(np.prod(shape)), init_value, storage)
        outs.append(o)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        write_blob(f"{tmp}/in", data + outs)
        proc = subprocess.run([str(exe), f"{tmp}/in", f"{tmp}/out", *map(str, grid), *map(str, threadgroup),
                               str(len(data))], capture_output=True, text=True, timeout=timeout,
                              check=False)
        if proc.returncode:
            raise RuntimeError(f"emulated kernel {name} failed: {proc.stderr.strip()}")
        raw = np.fromfile(f"{tmp}/out", np.uint8)
    results, pos = [], 0
    for shape, dt, o in zip(output_shapes, out_names, outs):
        n = o.nbytes
        arr = raw[pos:pos + n].view(TYPES[dt][1]).reshape(tuple(shape))
        pos += n
        results.append(bf16_to_f32(arr) if dt == "bfloat16" else arr.copy())
    return results


def emulate(spec, dialect="metal", **launch):
    """Run a `KernelSource` (the exact `mx.fast.metal_kernel` or, with dialect="cuda", `mx.fast.cuda_kernel`
    arguments) with a launch dict as the wrappers in kernels/metal.py build it."""
    return run_kernel(*spec, dialect=dialect, **launch)
