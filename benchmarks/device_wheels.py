"""The wheels a GPU machine without internet needs for opad: prepared here, installed there.

The lent GPU machines run an image with torch, triton, CUDA and most of opad's dependencies, but
not all of them (diffusers, open_clip_torch, lpips, the server's packages, ...) and no package index.
``python benchmarks/gpu_suite.py --prepare-wheels .whl`` runs :func:`prepare` on a machine where the
package registry answers: for every distribution ``opad[test]`` needs (followed through their own
requirements) that the GPU image lacks, it downloads the version installed *here* (the one the
test suite passed with) as a CPython 3.12 manylinux x86_64 wheel, and writes ``wheels.json``. On
the GPU machine the suite's install stage (:func:`install`) installs exactly those files offline.

The GPU stack is never replaced: torch, torchvision, torchaudio, triton and NVIDIA's CUDA wheels
stay as the image has them, whatever opad's own pins say.
"""

from __future__ import annotations

import datetime
import json
import re
import subprocess
import sys
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

MANIFEST = "wheels.json"
# the GPU machine: CPython 3.12 on x86_64 Linux (the device tool's KINDS.md, 2026-11)
TARGET_PYTHON = "3.12"
TARGET_MARKERS = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
                  "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
                  "implementation_name": "cpython", "platform_python_implementation": "CPython"}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
# The image's Python packages as the device tool's KINDS.md lists them ("Python packages already there",
# read on 2026-11-17). A name missing here is brought as a wheel; one listed here but absent on the
# machine is reported by the install stage's check, naming it.
DEVICE_IMAGE = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx humanize
huggingface-hub hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib
jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml
markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas
nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile
nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13
nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax
opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy
portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core
scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl
tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision
tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())
_GPU_STACK = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-.*|cuda-.*)$")


class WheelError(Exception):
    """One line saying what is missing or wrong."""


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def gpu_stack(name: str) -> bool:
    """torch, triton and the CUDA wheels: the GPU image's own, never brought or replaced."""
    return bool(_GPU_STACK.match(normalize(name)))


def _applies(req: Requirement, extras: Iterable[str], environment: dict[str, str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**environment, "extra": extra}) for extra in (*extras, ""))


def requirements(root: str = "opad", extras: Iterable[str] = ("test",),
                 environment: dict[str, str] | None = None, strict: bool = True) -> dict[str, Requirement]:
    """Every requirement ``root[extras]`` needs on the target, followed through the installed
    distributions' own requirements; by normalized name (the first requirement met for it).

    ``strict``: a required distribution that is not installed is an error (preparing wheels needs its
    version); otherwise it stays in the result, unfollowed, for :func:`unmet` to name."""
    environment = environment or TARGET_MARKERS
    found: dict[str, Requirement] = {}
    todo: list[tuple[str, tuple[str, ...]]] = [(root, tuple(extras))]
    seen: set[tuple[str, tuple[str, ...]]] = set()
    while todo:
        name, wanted = todo.pop()
        if (normalize(name), wanted) in seen:
            continue
        seen.add((normalize(name), wanted))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            if not strict:
                continue
            raise WheelError(f"{name} is not installed here, so its wheel version is unknown; install "
                             "opad's test extra first (pip install --no-build-isolation -e '.[test]')") from None
        for line in dist.requires or []:
            req = Requirement(line)
            if not _applies(req, wanted, environment) or gpu_stack(req.name):
                continue
            found.setdefault(normalize(req.name), req)
            todo.append((req.name, tuple(sorted(req.extras))))
    return found


def wheels_needed(required: Iterable[str], present: frozenset[str] = DEVICE_IMAGE) -> dict[str, str]:
    """{name: the version installed here} for each required distribution the GPU image lacks."""
    return {name: metadata.version(name) for name in sorted(required) if normalize(name) not in present}


def download_command(name: str, version: str, dest: Path) -> list[str]:
    """pip's command for one wheel of ``name==version`` for the GPU machine's Python, no dependencies."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "--python-version", TARGET_PYTHON, "--implementation", "cp", "--dest", str(dest)]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    return command + [f"{name}=={version}"]


def _wheel_file(folder: Path, name: str, version: str) -> Path | None:
    """The downloaded wheel of ``name==version`` (wheel names use underscores for dashes)."""
    stem = re.sub(r"[-_.]+", "_", name).lower()
    for path in folder.glob("*.whl"):
        dist, _, rest = path.name.partition("-")
        if dist.lower() == stem and Version(rest.partition("-")[0]) == Version(version):
            return path
    return None


def prepare(dest: Path, only: Iterable[str] | None = None, log=print) -> dict:
    """Download every wheel the GPU image lacks into ``dest`` and write its manifest; returns it.

    ``only`` restricts the download to those names (they must be among the needed ones)."""
    needed = wheels_needed(requirements())
    if only is not None:
        chosen = {normalize(n) for n in only}
        unknown = sorted(chosen - set(needed))
        if unknown:
            raise WheelError(f"{', '.join(unknown)}: not a wheel the GPU machine needs "
                             f"(those are {', '.join(needed)})")
        needed = {n: v for n, v in needed.items() if n in chosen}
    dest.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, version in needed.items():
        path = _wheel_file(dest, name, version)
        if path is None:
            run = subprocess.run(download_command(name, version, dest), capture_output=True, text=True)
            path = _wheel_file(dest, name, version)
            if run.returncode or path is None:
                why = (run.stderr.strip().splitlines() or ["no wheel came back"])[-1]
                raise WheelError(f"could not download {name}=={version} for CPython {TARGET_PYTHON} on manylinux "
                                 f"x86_64: {why}")
        files[name] = path.name
        log(f"  {path.name}")
    manifest = {"python": TARGET_PYTHON, "platform": "manylinux x86_64", "prepared": datetime.date.today().isoformat(),
                "versions": needed, "files": files}
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise WheelError(f"{folder} has no {MANIFEST}: prepare it first, where the package registry answers, "
                         f"with python benchmarks/gpu_suite.py --prepare-wheels {folder}")
    manifest = json.loads(path.read_text())
    missing = [f for f in manifest["files"].values() if not (folder / f).is_file()]
    if missing:
        raise WheelError(f"{folder} lacks {', '.join(missing)}, which its {MANIFEST} lists; prepare it again")
    return manifest


def install_command(folder: Path, python: str, target: Path | None = None) -> list[str]:
    """pip's offline install of exactly the manifest's wheels (no index, no dependency resolution)."""
    manifest = read_manifest(folder)
    command = [python, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile"]
    if target is not None:
        command += ["--target", str(target)]
    return command + [str(folder / f) for f in manifest["files"].values()]


def unmet(required: dict[str, Requirement]) -> list[str]:
    """Requirements the running environment does not satisfy, one phrase each (the GPU stack is
    the image's own and is not checked against opad's pins)."""
    problems = []
    for name, req in sorted(required.items()):
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            problems.append(f"{name} is missing")
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            problems.append(f"{name} {have} does not satisfy {req.specifier}")
    return problems

