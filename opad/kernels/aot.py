"""Compile every Triton kernel of opad for GPUs that are not here: sm_80 and sm_90, no driver needed.

``triton.compile`` takes an explicit target (``GPUTarget("cuda", 90, 32)``) and runs the whole
pipeline on the CPU, down to ptxas (Triton's own). :func:`variants` lists every launch the
wrappers can make — each kernel at every block size, patch size, dtype pair and warp count — from
the wrappers' own constants and choice functions, so a wrapper change cannot leave it stale;
:func:`compile_all` compiles them in a process pool and returns one :class:`Row` each: registers and
spills (from the ptxas log of that very compile), shared memory (what the launch requests), and
the compile time.

``benchmarks/kernel_resources.py`` writes the rows to benchmarks/results/kernel_resources.csv;
tests/test_kernels_aot.py compiles them all and fails on a compile error or a spill.

What the compile cannot know: the JIT specialises each launch on its arguments (a pointer aligned
to 16 bytes, an integer divisible by 16); here every pointer is taken as aligned (as fresh torch
allocations are) and every integer as unspecialised.
"""

from __future__ import annotations

import csv
import importlib
import io
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import redirect_stdout
from dataclasses import astuple, dataclass, field, fields
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

# every module with Triton kernels (a test checks no other file under opad/ has a @triton.jit)
KERNEL_MODULES = ("opad.kernels._swd_triton", "opad.kernels._kv_proj_triton")
ARCHS = (80, 90)  # Ampere (A100) and Hopper (H100), as the extension's default arch list
RGB = 3  # MS-SWD's images: Lab from sRGB, always three channels

_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class Variant:
    """One launch a wrapper can make: a kernel with its compile-time constants and warp count."""

    module: str
    kernel: str
    variant: str  # the constants that differ between this kernel's variants, as text
    pointers: dict[str, str]  # pointer arguments and their element types ("fp32", "i64", a torch dtype's)
    constexprs: dict[str, Any]  # torch dtypes become Triton's in the worker (picklable here)
    num_warps: int
    cost: int = field(default=1, compare=False)  # a guess of the compile time, to start long ones first


@dataclass(frozen=True)
class Row:
    kernel: str
    variant: str
    arch: str  # what ptxas compiled for: sm_80, sm_90a
    num_warps: int
    registers: int
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    stack_frame: int  # bytes
    shared: int  # bytes the launch requests
    compile_s: float
    error: str = ""

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


def kernels() -> dict[str, Any]:
    """Every Triton kernel of opad by name (the functions named ``*_kernel`` in :data:`KERNEL_MODULES`)."""
    import triton

    found = {}
    for name in KERNEL_MODULES:
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if attr.endswith("_kernel") and isinstance(value, (triton.runtime.JITFunction, _interpreted())):
                found[attr] = value
    return found


def _interpreted() -> type:
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction


def swd_patch_sizes() -> list[int]:
    """The patch sizes opad uses by default: the trainer's --swd-patch and ms_swd's default (both 11)."""
    from opad.config import TrainConfig
    from opad.kernels.swd import DEFAULT_PATCH  # ms_swd's default (opad.train.losses)

    return sorted({TrainConfig.swd_patch, DEFAULT_PATCH})


def variants() -> list[Variant]:
    """Every launch the wrappers of :data:`KERNEL_MODULES` can make."""
    from opad.kernels import _kv_proj_triton as kv
    from opad.kernels import _swd_triton as swd
    from opad.kernels import kv_proj

    out = []
    S = "opad.kernels._swd_triton"
    for block in swd.register_sort_blocks():
        out.append(Variant(S, "_sorted_diff_in_registers_kernel", f"BLOCK={block}",
                           {"px_ptr": "fp32", "py_ptr": "fp32", "sign_ptr": "i8", "partial_ptr": "fp32"},
                           {"BLOCK": block}, swd.register_sort_warps(block), cost=block))
    for k in swd_patch_sizes():
        out.append(Variant(S, "_project_kernel", f"KS={k}", {"x_ptr": "fp32", "w_ptr": "fp32", "out_ptr": "fp32"},
                           {"KS": k, **swd.PROJECT_BLOCKS}, swd.NUM_WARPS, cost=k * k))
        out.append(Variant(S, "_project_back_kernel", f"KS={k} C={RGB}",
                           {"sign_ptr": "i8", "scale_ptr": "fp32", "w_ptr": "fp32", "out_ptr": "fp32"},
                           {"KS": k, "BLOCK_C": swd.project_back_block_c(RGB), **swd.PROJECT_BACK_BLOCKS},
                           swd.NUM_WARPS, cost=k * k))
    out.append(Variant(S, "_abs_diff_kernel", f"BLOCK={swd.ABS_DIFF_BLOCK}",
                       {"sx_ptr": "fp32", "sy_ptr": "fp32", "idx_ptr": "i64", "sign_ptr": "i8", "partial_ptr": "fp32"},
                       {"BLOCK": swd.ABS_DIFF_BLOCK}, swd.NUM_WARPS))
    K = "opad.kernels._kv_proj_triton"
    blocks = {"BLOCK_M": kv.BLOCK_M, "BLOCK_N": kv.BLOCK_N, "BLOCK_K": kv.BLOCK_K}
    tables = ("w_ptrs", "out_cols", "tiles", "n_of", "hd_of", "gout_ptrs", "dw_ptrs")
    for x_dtype, w_dtype in kv_proj.kernel_dtypes():
        name = f"x={_DTYPE_NAMES[x_dtype]} w={_DTYPE_NAMES[w_dtype]}"
        consts = {"DTYPE": x_dtype, "W_DTYPE": w_dtype, **blocks}
        for kernel, own in (("_kv_forward_kernel", {"x_ptr": x_dtype, "out_base": x_dtype}),
                            ("_kv_dw_kernel", {"x_ptr": x_dtype}),
                            ("_kv_dx_kernel", {"dx_ptr": x_dtype})):
            args = getattr(kv, kernel).arg_names
            pointers = {**{t: "i64" for t in tables if t in args}, **own}
            out.append(Variant(K, kernel, name, pointers, consts, kv.num_warps(x_dtype)))
    return out


# ------------------------------------------------------------------ compiling (in worker processes)
def _setup_worker() -> None:
    # the test suite's interpreter flag would turn every kernel into an InterpretedFunction at import
    os.environ.pop("TRITON_INTERPRET", None)
    torch.set_num_threads(1)
    import triton

    triton.knobs.nvidia.dump_ptxas_log = True  # ptxas -v's report, printed: registers and spills
    triton.knobs.compilation.always_compile = True  # a cache hit would run no ptxas, so report nothing


_PTXAS = {
    "arch": re.compile(r"Compiling entry function '\w+' for '(sm_\w+)'"),
    "frame": re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"),
    "registers": re.compile(r"Used (\d+) registers"),
}


def parse_ptxas_log(log: str) -> dict[str, Any]:
    """Registers, spills and stack frame of the one kernel in a ``ptxas -v`` log."""
    found = {key: pattern.findall(log) for key, pattern in _PTXAS.items()}
    if any(len(v) != 1 for v in found.values()):
        raise ValueError(f"expected one kernel's ptxas -v report, got {found}")
    frame, stores, loads = map(int, found["frame"][0])
    return {"arch": found["arch"][0], "registers": int(found["registers"][0]), "stack_frame": frame,
            "spill_stores": stores, "spill_loads": loads}


def compile_variant(v: Variant, arch: int) -> Row:
    """Compile one variant for ``sm_<arch>`` (in a process set up by :func:`_setup_worker`)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from opad.kernels._kv_proj_triton import _TL

    fn = getattr(importlib.import_module(v.module), v.kernel)
    args = fn.arg_names
    unknown = set(v.pointers) - set(args) | set(v.constexprs) - set(args)
    if unknown:
        raise ValueError(f"{v.kernel} has no argument {sorted(unknown)}")
    pointer_type = {name: f"*{_DTYPE_NAMES.get(t, t)}" for name, t in v.pointers.items()}
    signature = {a: "constexpr" if a in v.constexprs else pointer_type.get(a, "i32") for a in args}
    constexprs = {a: _TL[c] if isinstance(c, torch.dtype) else c for a, c in v.constexprs.items()}
    attrs = {(args.index(a),): [["tt.divisibility", 16]] for a in v.pointers}
    start, log = time.perf_counter(), io.StringIO()
    base = dict(kernel=v.kernel, variant=v.variant, num_warps=v.num_warps)
    try:
        with redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                                      target=GPUTarget("cuda", arch, 32), options={"num_warps": v.num_warps})
        report = parse_ptxas_log(log.getvalue())
    except Exception as e:  # one row says what failed; the caller decides
        text = f"{type(e).__name__}: {e}".strip().splitlines()
        return Row(**base, arch=f"sm_{arch}", registers=-1, spill_stores=-1, spill_loads=-1, stack_frame=-1,
                   shared=-1, compile_s=round(time.perf_counter() - start, 2), error=text[0][:300] if text else "?")
    return Row(**base, **report, shared=compiled.metadata.shared, compile_s=round(time.perf_counter() - start, 2))


def _compile_pair(pair: tuple[Variant, int]) -> Row:
    return compile_variant(*pair)


def compile_all(todo: list[Variant], archs: tuple[int, ...] = ARCHS, workers: int | None = None) -> list[Row]:
    """Compile every variant for every arch in ``workers`` fresh processes (default: one per core).

    Fresh processes: the test suite runs kernels in Triton's interpreter, and a process that has
    imported them so cannot compile them. Rows come back in ``todo`` x ``archs`` order.
    """
    pairs = [(v, arch) for v in todo for arch in archs]
    order = sorted(range(len(pairs)), key=lambda i: -pairs[i][0].cost)  # long compiles first
    workers = max(1, min(workers or os.cpu_count() or 1, len(pairs)))
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_setup_worker) as pool:
        rows = list(pool.map(_compile_pair, [pairs[i] for i in order]))
    by_index = dict(zip(order, rows))
    return [by_index[i] for i in range(len(pairs))]


# ------------------------------------------------------------------ the table
COLUMNS = [f.name for f in fields(Row)]


def write_csv(rows: list[Row], path: str | Path, **same: str) -> Path:
    """The rows as CSV; ``same`` adds columns whose value every row shares (versions, date)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS + list(same))
        writer.writerows([*astuple(r), *same.values()] for r in rows)
    return path


def problems(rows: list[Row]) -> list[str]:
    """One line per compile error or spill."""
    out = []
    for r in rows:
        if r.error:
            out.append(f"{r.kernel} [{r.variant}] {r.arch}: {r.error}")
        elif r.spills:
            out.append(f"{r.kernel} [{r.variant}] {r.arch}, {r.num_warps} warps: spills "
                       f"{r.spill_stores} bytes stored, {r.spill_loads} loaded ({r.registers} registers)")
    return out


def table(rows: list[Row]) -> str:
    """The rows as an aligned text table."""
    head = ["kernel", "variant", "arch", "warps", "regs", "spill st/ld", "stack", "shared", "compile s"]
    body = [[r.kernel, r.variant, r.arch, str(r.num_warps), str(r.registers), f"{r.spill_stores}/{r.spill_loads}",
             str(r.stack_frame), str(r.shared), f"{r.compile_s:.1f}"] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(line, widths)) for line in [head, *body])


def versions() -> dict[str, str]:
    """Triton's version and the ptxas it compiles with (the numbers depend on both)."""
    import subprocess

    import triton
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = subprocess.run([get_ptxas(90).path, "--version"], capture_output=True, text=True).stdout
    release = re.search(r"release ([\d.]+)", ptxas)
    return {"triton": triton.__version__, "ptxas": release.group(1) if release else "?"}
