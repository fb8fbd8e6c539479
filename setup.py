"""Install opad. ``pip install --no-build-isolation -e .`` so the compiled extension ``opad._C``
builds against the installed (pinned) torch rather than a fresh one in an isolated build environment.

The extension (csrc/) always has its CPU part. Its CUDA part is built when nvcc and a CUDA build of
torch are present, or always with ``FORCE_CUDA=1``; ``OPAD_SKIP_CUDA_BUILD=1`` leaves it out. A
CUDA build honours ``TORCH_CUDA_ARCH_LIST`` (default below, with Hopper's 9.0) and ``MAX_JOBS``
(parallel compile jobs, through ninja). A compile error fails the install: it never falls back.
"""

import os
import sys

from setuptools import find_packages, setup

TORCH = ["torch==2.14.1", "torchvision==0.29.1"]
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"  # Ampere, Hopper, and PTX that newer GPUs compile at load


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _cuda_home() -> None:
    """Point torch's builder at the toolkit. It guesses CUDA_HOME from where ``nvcc`` is on PATH,
    which for a wrapper script such as /usr/local/bin/nvcc is /usr/local, without the libraries."""
    if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")) and os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"


def _extension_build() -> dict:
    """``ext_modules`` and ``cmdclass`` for opad._C, built with torch's extension builder."""
    _cuda_home()
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:  # e.g. pip's metadata step in an isolated environment; the README installs torch first
        print("opad: torch is not importable, so opad._C is not built (install torch first, then "
              "pip install --no-build-isolation -e .)", file=sys.stderr)
        return {}
    sources = ["csrc/feature_pass.cpp", "csrc/feature_pass_cpu.cpp", "csrc/resize_tables.cpp"]
    # ATen's parallel_for is OpenMP inlined into the extension; hidden symbols keep two builds
    # loaded in one process (a test loads a CPU-only one) from resolving to each other
    cxx = ["-O3", "-fopenmp", "-fvisibility=hidden"]
    nvcc_found = CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    if _flag("OPAD_SKIP_CUDA_BUILD"):
        with_cuda, why = False, "OPAD_SKIP_CUDA_BUILD=1"
    elif _flag("FORCE_CUDA"):
        with_cuda, why = True, "FORCE_CUDA=1"
    else:
        with_cuda = nvcc_found and torch.version.cuda is not None
        why = (f"nvcc in {CUDA_HOME}, torch CUDA {torch.version.cuda}" if with_cuda
               else "no nvcc" if not nvcc_found else "torch is a CPU build")
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        print(f"opad: building opad._C with CUDA ({why}; archs {os.environ['TORCH_CUDA_ARCH_LIST']})", file=sys.stderr)
        ext = CUDAExtension(
            "opad._C", sources + ["csrc/feature_pass_cuda.cu"], define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-Xcompiler", "-fvisibility=hidden"]}, extra_link_args=["-fopenmp"])
    else:
        print(f"opad: building opad._C for the CPU only ({why})", file=sys.stderr)
        ext = CppExtension("opad._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


SERVE = ["fastapi>=0.110", "uvicorn>=0.29", "prometheus_client>=0.20"]
RAY = ["ray[serve]>=2.40"]  # opad jobs --ray (Ray Core tasks), opad serve --ray (Ray Serve); tested with 2.60.0

setup(
    name="opad",
    version="0.1.0",
    description="One-step diffusion personalization by adversarial concept distillation (OPAD)",
    python_requires=">=3.10",
    # DESIGN.md §3: the export lives in export/ but installs as opad.export, its subpackages (exporter/,
    # engines/, runtime/, server/) as opad.export.*; a checkout's opad/export link is not searched twice
    packages=find_packages(include=["opad", "opad.*"], exclude=["opad.export", "opad.export.*"])
    + ["opad.export"] + [f"opad.export.{name}" for name in find_packages("export")],
    # The Triton kernels live in opad/kernels/, not a top-level kernels/: run from the repository root,
    # a top-level kernels/ package would shadow Hugging Face's `kernels`, which transformers (>= 5.25)
    # requires and imports.
    package_dir={"opad.export": "export"},
    # the mini world's trained weights ship inside the package (opad/world/weights, a few MB), and so
    # does the server's live page (export/server/page: plain HTML, CSS and JavaScript, no build step)
    package_data={"opad.world": ["weights/*.json", "weights/*/*.json", "weights/*/*.safetensors",
                                 "weights/*/*/*.json", "weights/*/*/*.safetensors", "weights/*/*.png"],
                  "opad.export.server": ["page/*.html", "page/*.css", "page/*.js"]},
    install_requires=[
        *TORCH,
        "diffusers>=0.35",
        "transformers>=5.0",
        "safetensors>=0.4",
        "open_clip_torch>=2.24",
        "timm>=1.0",
        "lpips>=0.1.4",
        "accelerate>=1.0",
        "peft>=0.15",  # the LoRA baseline (--method lora) and loading LoRA concepts
        "numpy",
        "Pillow",
        "tqdm",
        "tensorboard",  # training logs
        "matplotlib",  # the loss-curve PNG
        "pyyaml",  # --config FILE.yaml
    ],
    extras_require={
        # the export and server tests run real ONNX Runtime, real HTTP and the official openai client
        # cuobjdump (CUDA 13's, which reads older cubins too) lists opad._C's machine code per arch
        # playwright drives the system's Chromium (apt-get install chromium; never `playwright install`)
        "test": ["pytest>=8", "pytest-xdist>=3", "onnx", "onnxruntime", "onnxscript", *SERVE, "openai>=1.0", *RAY,
                 "playwright>=1.40",
                 "nvidia-cuda-cuobjdump>=13; platform_system == 'Linux' and platform_machine == 'x86_64'"],
        "export": ["onnx", "onnxruntime", "onnxscript"],  # onnxscript: the dynamo exporter's
        "serve": ["onnx", "onnxruntime", *SERVE],
        "trt": ["tensorrt"],
        "ray": RAY,  # opad jobs --ray (the jobs as Ray tasks), opad serve --ray (replicas on Ray Serve)
        "docs": ["mkdocs-material>=9"],  # the docs/ site; tests/test_docs.py builds it with --strict
    },
    entry_points={"console_scripts": ["opad=opad.cli:main"]},
    **_extension_build(),
)
