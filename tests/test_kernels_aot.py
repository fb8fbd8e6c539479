"""Every Triton kernel compiles for sm_80 and sm_90 without spilling, and opad._C holds both archs'
machine code: the GPU build checked on a machine without a GPU.

The compile test takes about a minute on two cores (Triton's LLVM and ptxas; the register sort at
4096 values for sm_80 is the longest, ~15 s): it compiles every variant, in a process pool.
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from opad.kernels import aot, dispatch

REPO = Path(__file__).resolve().parents[1]


def test_every_triton_kernel_of_opad_is_enumerated():
    sources = [p for folder in ("opad", "export") for p in (REPO / folder).rglob("*.py")]
    jitted = {p.relative_to(REPO).with_suffix("").as_posix().replace("/", ".")
              for p in sources if re.search(r"^@triton\.jit", p.read_text(), re.M)}
    assert jitted == set(aot.KERNEL_MODULES)  # a new kernel file must be listed there
    kernels = aot.kernels()
    assert len(kernels) == 7 and {v.kernel for v in aot.variants()} == set(kernels)


def test_variants_follow_the_wrappers_choices():
    from opad.kernels import _swd_triton as swd
    from opad.kernels import kv_proj

    sorts = {v.constexprs["BLOCK"]: v.num_warps for v in aot.variants() if v.kernel.startswith("_sorted_diff")}
    assert max(sorts) == swd.REGISTER_SORT_CAP >= swd.REGISTER_SORT_MAX and min(sorts) == 1
    assert all(sorts[swd.register_sort_block(n)] == swd.register_sort_warps(swd.register_sort_block(n))
               for n in (1, 3, 37, 1000, 1025, 2049, swd.REGISTER_SORT_CAP))
    kv = {(v.constexprs["DTYPE"], v.constexprs["W_DTYPE"]) for v in aot.variants() if v.kernel == "_kv_dx_kernel"}
    assert kv == set(kv_proj.kernel_dtypes()) and len(kv) == 7
    assert aot.swd_patch_sizes() == [11]


def test_ptxas_log_parsing():
    log = ("ptxas info    : Compiling entry function '_k' for 'sm_90a'\nptxas info    : Function properties for _k\n"
           "    8 bytes stack frame, 132 bytes spill stores, 116 bytes spill loads\n"
           "ptxas info    : Used 128 registers, used 1 barriers\n")
    assert aot.parse_ptxas_log(log) == {"arch": "sm_90a", "registers": 128, "stack_frame": 8, "spill_stores": 132,
                                        "spill_loads": 116}
    with pytest.raises(ValueError, match="one kernel"):
        aot.parse_ptxas_log(log + log)


def test_every_kernel_variant_compiles_for_sm80_and_sm90_without_spills(tmp_path):
    todo = aot.variants()
    rows = aot.compile_all(todo, aot.ARCHS, workers=2)
    path = aot.write_csv(rows, tmp_path / "kernel_resources.csv")
    assert aot.problems(rows) == []
    assert len(rows) == 2 * len(todo) and {r.arch for r in rows} == {"sm_80", "sm_90a"}
    # below the 255-register cap too: a kernel at the cap (the register sort at 4096 with 4 warps)
    # has no headroom, and the next change spills
    assert all(0 < r.registers < 255 and r.stack_frame == 0 for r in rows), [r for r in rows if r.registers >= 255]
    assert path.read_text().count("\n") == len(rows) + 1


def test_a_spilling_kernel_is_reported():
    """The check above can fail: the register sort at 8192 values spills at any warp count."""
    from opad.kernels import _swd_triton as swd

    big = next(v for v in aot.variants() if v.kernel.startswith("_sorted_diff"))
    spilling = aot.Variant(big.module, big.kernel, "BLOCK=8192", big.pointers, {"BLOCK": 8192}, 32)
    (row,) = aot.compile_all([spilling], (90,), workers=1)
    assert row.spills and "spills" in aot.problems([row])[0]
    assert 8192 > swd.REGISTER_SORT_CAP  # the wrapper never launches it


# ------------------------------------------------------------------ the extension's machine code
def _cuobjdump() -> str | None:
    """cuobjdump on PATH, from the nvidia-cuda-cuobjdump wheel (setup.py's test extra), or Triton's own."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        files = importlib.metadata.files("nvidia-cuda-cuobjdump") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == "cuobjdump":
            return str(f.locate())
    try:
        import triton

        return triton.knobs.nvidia.cuobjdump.path
    except Exception:  # no Triton, or no NVIDIA backend in it
        return None


def _default_archs() -> tuple[set[str], set[str]]:
    """setup.py's DEFAULT_CUDA_ARCHS as (cubin archs, PTX archs): "8.0;9.0+PTX" -> sm_80, sm_90; sm_90."""
    value = re.search(r'DEFAULT_CUDA_ARCHS = "([^"]+)"', (REPO / "setup.py").read_text()).group(1)
    entries = [e.strip() for e in value.split(";")]
    sm = lambda e: "sm_" + e.split("+")[0].replace(".", "")  # noqa: E731
    return {sm(e) for e in entries}, {sm(e) for e in entries if e.endswith("+PTX")}


def test_the_extension_holds_sm80_and_sm90_machine_code():
    module, problem = dispatch._load_extension()
    if module is None:
        pytest.skip(problem)
    if not module.cuda_built():
        pytest.skip("opad._C was built without its CUDA part (no nvcc at install time): no GPU code to check")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump: pip install nvidia-cuda-cuobjdump (setup.py's test extra) or put it on PATH")
    cubins, ptx = _default_archs()
    assert cubins == {"sm_80", "sm_90"} and ptx == {"sm_90"}
    elf = subprocess.run([tool, "--list-elf", module.__file__], capture_output=True, text=True, check=True).stdout
    listed = subprocess.run([tool, "--list-ptx", module.__file__], capture_output=True, text=True, check=True).stdout
    assert set(re.findall(r"\.(sm_\d+)\.cubin", elf)) == cubins, elf
    assert set(re.findall(r"\.(sm_\d+)\.ptx", listed)) == ptx, listed
