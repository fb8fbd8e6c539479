"""The GPU suite's CPU-side parts: its arguments, the wheel folder it installs from, and its summary.

The suite itself (benchmarks/gpu_suite.py) is for a GPU machine; here it runs its plumbing on the CPU
(--allow-cpu --quick: real benchmark scripts at small sizes, rows to a temporary results file).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from importlib import metadata
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "benchmarks" / "gpu_suite.py"
sys.path.insert(0, str(REPO / "benchmarks"))
import device_wheels  # noqa: E402
import gpu_suite  # noqa: E402


def run_suite(*args: str, results: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OPAD_RESULTS": str(results)} if results else dict(os.environ)
    env.pop("OUT", None)  # the device tool's output folder must not leak into a test's default
    return subprocess.run([sys.executable, str(SUITE), *args], cwd=REPO, env=env, capture_output=True, text=True)


@pytest.mark.parametrize("argv, message", [
    (["--stages", "env,warp"], "unknown stage(s) warp"),
    (["--stages", "env", "--skip", "env"], "no stage left to run"),
    (["--budget-s", "0"], "--budget-s must be positive"),
    (["--only", "diffusers"], "--only goes with --prepare-wheels"),
])
def test_bad_arguments_are_one_line(argv, message):
    run = run_suite(*argv)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("error: ") and message in run.stderr


def test_dry_run_prints_each_stage_and_writes_nothing(tmp_path):
    run = run_suite("--dry-run", "--skip", "inference", "--out", str(tmp_path / "out"))
    assert run.returncode == 0, run.stderr
    assert [line.split()[0] for line in run.stdout.splitlines()[:-1]] == list(gpu_suite.STAGES[:-1])
    assert not (tmp_path / "out").exists()


def test_plumbing_run_on_the_cpu_writes_summary_rows_and_logs(tmp_path):
    import opad._C

    results = tmp_path / "results.csv"
    # the extension stage checks the CUDA part's machine code: where nvcc built it (as in CI)
    stages = ["env", "install", *(["extension"] if opad._C.cuda_built() else []), "kernels"]
    run = run_suite("--allow-cpu", "--quick", "--stages", ",".join(stages), "--install", "never",
                    "--out", str(tmp_path / "out"), results=results)
    assert run.returncode == 0, run.stdout + run.stderr
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert [(s["stage"], s["status"]) for s in summary["stages"]] == [(stage, "passed") for stage in stages]
    # the benchmark scripts' rows went to OPAD_RESULTS, and this run's rows to the output folder
    names = {row.split(",")[0] for row in (out / "results.csv").read_text().splitlines()[1:]}
    assert {"ms_swd_fwd_bwd", "kv_proj_fwd_bwd", "feature_pass_fwd_bwd"} <= names
    assert results.read_text().count("\n") == (out / "results.csv").read_text().count("\n")
    verdicts = {t["target"]: t["verdict"] for t in summary["targets"]}
    assert "met" not in verdicts.values() and "missed" not in verdicts.values()  # CPU figures are not judged
    assert verdicts["feature pass fwd+bwd speed vs torch"] == "not judged"  # its CPU rows exist: shown only
    with tarfile.open(out / "logs.tar.gz") as tar:
        kernels_log = tar.extractfile("kernels.log").read().decode()
    assert "bench_swd.py --size 64" in kernels_log and "[exit 0]" in kernels_log
    table = (out / "summary.md").read_text()
    assert "| kernels | passed |" in table and run.stdout.rstrip().endswith(f"summary, rows and logs in {out}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="shows what happens without a GPU")
def test_without_a_gpu_it_stops_after_env_and_still_writes_the_summary(tmp_path):
    run = run_suite("--stages", "env,install,tests", "--out", str(tmp_path))
    assert run.returncode == 1
    stages = json.loads((tmp_path / "summary.json").read_text())["stages"]
    assert [(s["stage"], s["status"]) for s in stages] == [("env", "failed"), ("install", "skipped"),
                                                           ("tests", "skipped")]
    assert "no CUDA GPU" in stages[0]["note"] and "--allow-cpu" in stages[0]["note"]


def test_install_refuses_an_unprepared_wheel_folder_before_any_work(tmp_path):
    run = run_suite("--allow-cpu", "--stages", "env,install", "--install", "always", "--wheels",
                    str(tmp_path / "nowhere"), "--venv", str(tmp_path / "venv"), "--out", str(tmp_path / "out"))
    assert run.returncode == 1
    install = json.loads((tmp_path / "out" / "summary.json").read_text())["stages"][1]
    assert install["status"] == "failed" and "has no wheels.json: prepare it first" in install["note"]
    assert not (tmp_path / "venv").exists()


def test_the_full_size_stages_arguments_are_the_benchmarks_own():
    """The stages that only a GPU runs pass options their scripts accept (checked by the scripts' parsers)."""
    import bench_fullsize_inference
    import bench_fullsize_train

    train = bench_fullsize_train.build_parser().parse_args(["--models", "M", *gpu_suite.TRAIN_ARGS])
    assert (train.resolution, train.batch_size, train.dtype, train.gradient_checkpointing) == (512, 2, "bf16", False)
    infer = bench_fullsize_inference.build_parser().parse_args(["--models", "M", *gpu_suite.INFERENCE_ARGS])
    assert infer.compile_mode == "reduce-overhead" and "compiled" in infer.providers.split(",")
    assert set(infer.providers.split(",")) <= set(bench_fullsize_inference.PROVIDERS)


def test_the_install_venv_sees_this_interpreters_packages(tmp_path):
    """The GPU image's python is itself a virtualenv: a venv made from it with --system-site-packages
    would see the base interpreter's packages, not torch; the suite's venv adds this one's site dirs."""
    args = gpu_suite.parse_args(["--allow-cpu", "--out", str(tmp_path / "out")])
    suite = gpu_suite.Suite(args, tmp_path / "out", deadline=float("inf"))
    python = gpu_suite._venv_over_this_python(suite, tmp_path / "venv")
    probe = "import sys, torch, diffusers; print(sys.prefix); print(torch.__version__)"
    run = subprocess.run([python, "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    prefix, version = run.stdout.split()
    assert Path(prefix) == tmp_path / "venv" and version == torch.__version__


def _row(name, provider, median, peak=100.0, images=None, shape="s", device="NVIDIA H100 80GB HBM3"):
    return {"name": name, "provider": provider, "shape": shape, "median_ms": str(median), "peak_mem_mb": str(peak),
            "images_per_s": "" if images is None else str(images), "device": device}


def test_targets_are_judged_from_the_rows_as_the_benchmarks_write_them():
    rows = [_row("ms_swd_fwd_bwd", "reference", 96.0, peak=3000), _row("ms_swd_fwd_bwd", "triton", 30.0, peak=1800),
            _row("kv_proj_fwd_bwd", "reference", 1.2), _row("kv_proj_fwd_bwd", "triton", 1.0),
            _row("fullsize/infer_1step", "compiled", 13.5, shape="b1x512"),
            _row("fullsize/infer_1step", "compiled", 60.0, images=133.0, shape="b8x512"),
            _row("fullsize/train/iteration", "torch", 412.0, peak=30 * 1024, shape="b2x512,paper,no,bf16")]
    got = {t["target"]: (t["figure"], t["verdict"]) for t in gpu_suite.evaluate_targets(rows)}
    assert got["MS-SWD fwd+bwd speed vs torch"] == (3.2, "met")
    assert got["MS-SWD fwd+bwd memory vs torch"] == (0.6, "missed")  # 1800 / 3000 MB > 1/2
    assert got["K/V projections fwd+bwd speed vs torch"] == (1.2, "missed")
    assert got["feature pass fwd+bwd speed vs torch"] == (None, "unmeasured")
    assert got["1-step 512x512 b1 latency (compiled)"] == (13.5, "met")
    assert got["1-step 512x512 b8 throughput (compiled)"] == (133.0, "missed")
    assert got["full-size training iteration (512x512, batch 2, bf16)"] == (412.0, "missed")
    assert got["its peak GPU memory"] == (30.0, "met")
    cpu = [_row("kv_proj_fwd_bwd", p, m, device="cpu (x86_64, 2 threads)") for p, m in (("reference", 9), ("triton", 1))]
    judged = {t["target"]: t for t in gpu_suite.evaluate_targets(cpu)}["K/V projections fwd+bwd speed vs torch"]
    assert (judged["figure"], judged["verdict"], judged["why"]) == (9.0, "not judged", "a CPU figure")


def test_the_wheels_follow_opads_test_extra_and_leave_the_gpu_stack_alone():
    required = device_wheels.requirements()
    assert {"diffusers", "open-clip-torch", "lpips", "fastapi", "openai", "numpy", "transformers"} <= set(required)
    assert not any(device_wheels.gpu_stack(name) for name in required)  # torch, triton, nvidia-*: the image's
    needed = device_wheels.wheels_needed(required)
    assert {"diffusers", "open-clip-torch", "lpips"} <= set(needed) and not {"numpy", "transformers"} & set(needed)
    assert needed["diffusers"] == metadata.version("diffusers")  # the version the suite passed with here


def test_unmet_names_missing_and_too_old_distributions():
    problems = device_wheels.unmet({"numpy": Requirement("numpy<1"), "no-such-dist": Requirement("no-such-dist")})
    assert problems == ["no-such-dist is missing", f"numpy {metadata.version('numpy')} does not satisfy <1"]
    assert device_wheels.unmet(device_wheels.requirements()) == []  # this environment has them all
    with pytest.raises(device_wheels.WheelError, match="no-such-dist is not installed here"):
        device_wheels.requirements("no-such-dist", extras=())
    assert device_wheels.requirements("no-such-dist", extras=(), strict=False) == {}


def test_prepared_wheels_install_offline(tmp_path):
    """A real download from the package registry (one small wheel), then pip's offline install of it."""
    folder = tmp_path / "wheels"
    run = run_suite("--prepare-wheels", str(folder), "--only", "wcwidth")
    assert run.returncode == 0, run.stderr
    manifest = json.loads((folder / "wheels.json").read_text())
    assert manifest["versions"] == {"wcwidth": metadata.version("wcwidth")} and manifest["python"] == "3.12"
    assert (folder / manifest["files"]["wcwidth"]).is_file()
    site = tmp_path / "site"
    subprocess.run(device_wheels.install_command(folder, sys.executable, target=site), check=True)
    probe = subprocess.run([sys.executable, "-c", "import wcwidth; print(wcwidth.__file__)"],
                           env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True, text=True, cwd=tmp_path)
    assert probe.stdout.startswith(str(site))
    (folder / manifest["files"]["wcwidth"]).unlink()
    with pytest.raises(device_wheels.WheelError, match=f"lacks {manifest['files']['wcwidth']}"):
        device_wheels.read_manifest(folder)


def test_preparing_a_wheel_the_gpu_machine_does_not_need_is_refused(tmp_path):
    run = run_suite("--prepare-wheels", str(tmp_path), "--only", "numpy")
    assert run.returncode == 2 and "numpy: not a wheel the GPU machine needs" in run.stderr
