"""The first thing to run on a GPU machine: builds opad there, runs its GPU tests and benchmarks, and
prints one summary table (at most about 8 minutes on one H100).

From a fresh copy of the repository on a machine with torch, triton and nvcc but no internet:

  env        the GPU, its driver, the torch / triton / CUDA versions
  install    a virtualenv over the machine's own packages, the wheels of
             --wheels (prepared beforehand, see below), and opad (pip -e: builds opad._C with CUDA)
  extension  opad._C imports with its CUDA part and holds sm_80 and sm_90 machine code
  tests      every test marked gpu, and the kernel tests (they run the Triton kernels on CUDA there)
  kernels    MS-SWD, K/V projection and feature pass against their torch references
  fullsize   the full-size SD 2.1 / SD-Turbo random-weight models (python -m opad.fullsize)
  train      one full-size OPAD training iteration at 512x512 in bf16
  inference  1 step at 512x512 on the full-size student: latency at batch 1, throughput at batch 8

Each stage runs as subprocesses with its own time limit inside one overall budget (--budget-s);
a stage that fails or runs out of time is recorded and the next one runs. The summary gives each
stage's outcome and each target's figure against the issue's goals (SWD >= 3x its reference at
<= 1/2 the memory, K/V >= 1.5x, feature pass >= 2x, 1-step 512x512 b1 <= 15 ms, >= 150 img/s at
b8, a training iteration <= 0.3 s). Rows go to benchmarks/results/results.csv as every benchmark's do; the
summary (summary.md, summary.json), this run's rows (results.csv) and the logs (logs.tar.gz) go to
--out (default: $OUT where the device tool sets it, else gpu-suite-out/).

First, where the package registry answers (this machine), the wheels the GPU image lacks:

    python benchmarks/gpu_suite.py --prepare-wheels .whl

then on the GPU machine (the device tool: carry .whl):

    python3 benchmarks/gpu_suite.py --wheels .whl

Exit status: 0 when every stage passed, 1 when one failed or timed out (targets missed are
reported, not failures), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import site
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import device_wheels  # noqa: E402  (a sibling script module, as common.py is to the benchmarks)

# the longest-running and least certain stage (compiling at full size) last, so the budget cuts it first
STAGES = ("env", "install", "extension", "tests", "kernels", "fullsize", "train", "inference")
# seconds each stage may take at most (the overall --budget-s cuts further)
STAGE_LIMITS = {"env": 30, "install": 240, "extension": 30, "tests": 150, "kernels": 150, "fullsize": 120,
                "train": 150, "inference": 300}
GPU_ARCHS = ("sm_80", "sm_90")


class SuiteError(Exception):
    """A problem with the suite's own arguments or files: one line, exit 2."""


class StageFailed(Exception):
    """The stage ran and failed; the message is the summary's note."""


@dataclass
class StageResult:
    stage: str
    status: str  # passed | failed | timeout | skipped
    seconds: float = 0.0
    note: str = ""


@dataclass
class Suite:
    """What every stage shares: the python to run, where logs and rows go, and the clock."""

    args: argparse.Namespace
    out: Path
    deadline: float
    python: str = sys.executable
    logs: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, stage: str, command: list[str], limit: float, check: bool = True) -> subprocess.CompletedProcess:
        """Run ``command`` in the repository root within ``limit`` seconds (and the overall budget),
        its output appended to the stage's log. A non-zero exit raises StageFailed with its last line."""
        timeout = min(limit, self.remaining())
        if timeout <= 1:
            raise TimeoutError("no time left in --budget-s")
        header = f"$ {' '.join(command)}\n"
        try:
            done = subprocess.run(command, cwd=REPO, env={**os.environ, **self.env}, capture_output=True, text=True,
                                  timeout=timeout)
        except OSError as e:  # the program itself is missing (e.g. no cuobjdump on PATH)
            raise StageFailed(f"cannot run {command[0]}: {e.strerror}") from None
        except subprocess.TimeoutExpired as e:
            text = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            self.logs[stage] = self.logs.get(stage, "") + header + text + f"\n[timed out after {timeout:.0f} s]\n"
            raise TimeoutError(f"{command[-1] if len(command) < 4 else ' '.join(command[1:4])}... "
                               f"timed out after {timeout:.0f} s") from None
        self.logs[stage] = self.logs.get(stage, "") + header + done.stdout + done.stderr + f"[exit {done.returncode}]\n"
        if check and done.returncode:
            lines = [line for line in (done.stderr + done.stdout).strip().splitlines() if line.strip()]
            raise StageFailed(f"{' '.join(command[1:3])} exited {done.returncode}: {lines[-1][:200] if lines else ''}")
        return done


# ---------------------------------------------------------------------------------------- stages
def stage_env(suite: Suite) -> str:
    probe = ("import torch, triton, json; c = torch.cuda.is_available(); "
             "print(json.dumps({'cuda': c, 'gpu': torch.cuda.get_device_name(0) if c else None, "
             "'torch': torch.__version__, 'cuda_version': torch.version.cuda, 'triton': triton.__version__, "
             "'gpus': torch.cuda.device_count()}))")
    info = json.loads(suite.run("env", [suite.python, "-c", probe], 60).stdout.strip().splitlines()[-1])
    text = (f"{info['gpu'] or 'no GPU'}, torch {info['torch']} (CUDA {info['cuda_version']}), triton {info['triton']}, "
            f"python {platform.python_version()}")
    if not info["cuda"] and not suite.args.allow_cpu:
        raise StageFailed(f"no CUDA GPU ({text}); --allow-cpu runs the stages on the CPU (plumbing, not figures)")
    return text


def stage_install(suite: Suite) -> str:
    mode = suite.args.install
    if mode == "never" or (mode == "auto" and _opad_is_installed(suite.python)):
        return f"opad already installed for {suite.python}" if mode == "auto" else "skipped (--install never)"
    wheels = Path(suite.args.wheels)
    manifest = device_wheels.read_manifest(wheels)  # a missing or incomplete folder stops here, before any work
    venv = Path(suite.args.venv)
    python = _venv_over_this_python(suite, venv)
    suite.run("install", device_wheels.install_command(wheels, python), 120)
    suite.env["MAX_JOBS"] = suite.env.get("MAX_JOBS") or str(os.cpu_count() or 4)
    suite.run("install", [python, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-build-isolation",
                          "-e", str(REPO)], 200)
    check = ("import sys; sys.path.insert(0, 'benchmarks'); import device_wheels as d; "
             "p = d.unmet(d.requirements(strict=False)); print('; '.join(p)); sys.exit(1 if p else 0)")
    unmet = suite.run("install", [python, "-c", check], 60, check=False)
    suite.python = python
    if unmet.returncode:
        raise StageFailed(f"installed, but: {unmet.stdout.strip()[:300]}")
    return f"{len(manifest['files'])} wheels + opad into {venv}"


def _venv_over_this_python(suite: Suite, venv: Path) -> str:
    """A fresh virtualenv that sees this interpreter's packages (torch, triton, ...) after its own.

    Not ``--system-site-packages``: made from a virtualenv's python (the GPU image's is one) that shows
    the base interpreter's packages, not the image's; a .pth file adds this interpreter's site dirs
    (``site.addsitedir``, so their own .pth files apply too)."""
    suite.run("install", [sys.executable, "-m", "venv", "--clear", str(venv)], 60)
    python = str(venv / "bin" / "python")
    probe = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    purelib = Path(suite.run("install", [python, "-c", probe], 30).stdout.strip().splitlines()[-1])
    dirs = [d for d in site.getsitepackages() if Path(d).is_dir()]
    (purelib / "zz_opad_gpu_image.pth").write_text("".join(f"import site; site.addsitedir({d!r})\n" for d in dirs))
    return python


def _opad_is_installed(python: str) -> bool:
    probe = "import opad, pathlib, sys; sys.exit(0 if pathlib.Path(opad.__file__).parents[1] == pathlib.Path.cwd() else 1)"
    return subprocess.run([python, "-c", probe], cwd=REPO, capture_output=True).returncode == 0


def stage_extension(suite: Suite) -> str:
    probe = "import torch, opad._C as c; print(c.cuda_built())"
    if suite.run("extension", [suite.python, "-c", probe], 60).stdout.strip().splitlines()[-1] != "True":
        raise StageFailed("opad._C was built without its CUDA part (was nvcc on PATH or in /usr/local/cuda?)")
    # the test suite's own check: cuobjdump lists exactly the cubins and PTX that setup.py's arch list asks for
    xml = suite.out / "junit-extension.xml"
    suite.run("extension", [suite.python, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", f"--junitxml={xml}",
                            "tests/test_kernels_aot.py::test_the_extension_holds_sm80_and_sm90_machine_code"],
              STAGE_LIMITS["extension"], check=False)
    if junit_counts(xml)["passed"] != 1:
        raise StageFailed("the extension's machine-code check did not pass (see extension.log)")
    return f"CUDA part built; machine code for {', '.join(GPU_ARCHS)}"


def stage_tests(suite: Suite) -> str:
    notes = []
    for label, selection in (("gpu-marked", ["-m", "gpu", "tests"]), ("kernels", ["tests/test_kernels.py"])):
        xml = suite.out / f"junit-{label}.xml"
        suite.run("tests", [suite.python, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider",
                            f"--junitxml={xml}", *selection], STAGE_LIMITS["tests"], check=False)
        counts = junit_counts(xml)
        notes.append(f"{label}: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped")
        if counts["failed"] or counts["passed"] == 0 and not suite.args.allow_cpu:
            raise StageFailed("; ".join(notes))
    return "; ".join(notes)


def junit_counts(path: Path) -> dict[str, int]:
    """passed / failed / skipped from pytest's junit XML (errors count as failed)."""
    import xml.etree.ElementTree as ET

    if not path.is_file():
        raise StageFailed(f"pytest wrote no {path.name} (it could not start; see the log)")
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    for case in ET.parse(path).getroot().iter("testcase"):
        kinds = {child.tag for child in case}
        counts["failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds else "passed"] += 1
    return counts


def stage_kernels(suite: Suite) -> str:
    quick = suite.args.quick
    commands = [["benchmarks/bench_swd.py", *(["--size", "64", "--repeats", "1"] if quick else [])],
                ["benchmarks/bench_kv_proj.py", *(["--repeats", "2"] if quick else [])],
                ["benchmarks/bench_feature_pass.py", *(["--size", "128", "--repeats", "2"] if quick else [])]]
    for command in commands:
        suite.run("kernels", [suite.python, *command], STAGE_LIMITS["kernels"])
    return f"{len(commands)} benchmarks"


def stage_fullsize(suite: Suite) -> str:
    folder = Path(suite.args.models)
    if (folder / "student").is_dir() and (folder / "teacher").is_dir():
        return f"reusing {folder}"
    suite.run("fullsize", [suite.python, "-m", "opad.fullsize", str(folder)], STAGE_LIMITS["fullsize"])
    return f"wrote {folder}"


# reduce-overhead (CUDA graphs, no kernel autotuning): the runner's max-autotune compiles for many
# minutes at full size, past the stage's limit (run bench_fullsize_inference.py by hand for it)
INFERENCE_ARGS = ["--providers", "diffusers,eager,compiled,tensorrt", "--compile-mode", "reduce-overhead",
                  "--warmup", "3"]
# the paper's batch of 2 in bf16, without checkpointing: estimated at 28 GB (docs/fullsize.md), so it
# fits an 80 GB GPU, and the figure is the iteration's speed
TRAIN_ARGS = ["--resolution", "512", "--batch-size", "2", "--dtype", "bf16", "--no-gradient-checkpointing"]


def stage_inference(suite: Suite) -> str:
    for batch in (1, 8):
        suite.run("inference", [suite.python, "benchmarks/bench_fullsize_inference.py", "--models", suite.args.models,
                                *INFERENCE_ARGS, "--batch", str(batch)], STAGE_LIMITS["inference"] / 2)
    return "batch 1 and 8 (compiled: reduce-overhead)"


def stage_train(suite: Suite) -> str:
    suite.run("train", [suite.python, "benchmarks/bench_fullsize_train.py", "--models", suite.args.models,
                        *TRAIN_ARGS], STAGE_LIMITS["train"])
    return "one iteration, batch 2, bf16"


STAGE_FUNCTIONS = {"env": stage_env, "install": stage_install, "extension": stage_extension, "tests": stage_tests,
                   "kernels": stage_kernels, "fullsize": stage_fullsize, "inference": stage_inference,
                   "train": stage_train}


# ---------------------------------------------------------------------------------------- targets
@dataclass(frozen=True)
class Target:
    """One of the issue's goals, read off this run's result rows."""

    label: str
    name: str  # the rows' name
    kind: str  # speedup | memory (ratio to the reference) | latency_ms | images_per_s | peak_gib
    goal: float
    provider: str = "triton"  # the accelerated row (speedup/memory: against provider "reference")
    shape_has: str = ""  # a substring the row's shape must contain

    def evaluate(self, rows: list[dict], quick: bool = False) -> dict:
        mine = [r for r in rows if r["name"] == self.name and self.shape_has in r.get("shape", "")]
        fast = [r for r in mine if r["provider"] == self.provider]
        if not fast:
            return self._result(None, f"no {self.provider} row for {self.name} in this run")
        row = fast[-1]
        # a CPU's figure or a --quick size says nothing about the goal: shown, not judged
        why = "a CPU figure" if row["device"].startswith("cpu") else "--quick sizes" if quick else ""
        if self.kind in ("speedup", "memory"):
            ref = [r for r in mine if r["provider"] == "reference" and r["shape"] == row["shape"]]
            if not ref:
                return self._result(None, f"no reference row for {self.name}")
            column = "median_ms" if self.kind == "speedup" else "peak_mem_mb"
            ratio = float(ref[-1][column]) / float(row[column])
            return self._result(ratio if self.kind == "speedup" else 1 / ratio, why)
        column = {"latency_ms": "median_ms", "images_per_s": "images_per_s", "peak_gib": "peak_mem_mb"}[self.kind]
        value = float(row[column]) / (1024 if self.kind == "peak_gib" else 1)
        return self._result(value, why)

    def _result(self, value: float | None, why: str = "") -> dict:
        lower_is_better = self.kind in ("memory", "latency_ms", "peak_gib")
        if value is None:
            verdict = "unmeasured"
        elif why:
            verdict = "not judged"
        else:
            verdict = "met" if (value <= self.goal if lower_is_better else value >= self.goal) else "missed"
        unit = {"speedup": "x", "memory": "x", "latency_ms": " ms", "images_per_s": " img/s", "peak_gib": " GiB"}[
            self.kind]
        sign = "<=" if lower_is_better else ">="
        return {"target": self.label, "figure": None if value is None else round(value, 3), "unit": unit.strip(),
                "goal": f"{sign} {self.goal:g}{unit}", "verdict": verdict, "why": why}


TARGETS = [
    Target("MS-SWD fwd+bwd speed vs torch", "ms_swd_fwd_bwd", "speedup", 3.0),
    Target("MS-SWD fwd+bwd memory vs torch", "ms_swd_fwd_bwd", "memory", 0.5),
    Target("K/V projections fwd+bwd speed vs torch", "kv_proj_fwd_bwd", "speedup", 1.5),
    Target("feature pass fwd+bwd speed vs torch", "feature_pass_fwd_bwd", "speedup", 2.0, provider="opad._C"),
    Target("1-step 512x512 b1 latency (compiled)", "fullsize/infer_1step", "latency_ms", 15.0, "compiled", "b1x"),
    Target("1-step 512x512 b8 throughput (compiled)", "fullsize/infer_1step", "images_per_s", 150.0, "compiled",
           "b8x"),
    Target("full-size training iteration (512x512, batch 2, bf16)", "fullsize/train/iteration", "latency_ms", 300.0,
           "torch", "b2x512"),
    Target("its peak GPU memory", "fullsize/train/iteration", "peak_gib", 40.0, "torch", "b2x512"),
]


def evaluate_targets(rows: list[dict], quick: bool = False) -> list[dict]:
    return [t.evaluate(rows, quick) for t in TARGETS]


# ---------------------------------------------------------------------------------------- output
def result_rows(path: Path, skip: int) -> list[dict]:
    """The rows of the results file after its first ``skip`` data rows (those this run appended)."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))[skip:]


def count_rows(path: Path) -> int:
    return len(result_rows(path, 0))


def summary_markdown(info: dict) -> str:
    lines = [f"# GPU suite, {info['date']}", "", f"Machine: {info['machine']}", "",
             "| stage | status | seconds | note |", "|---|---|---|---|"]
    lines += [f"| {s['stage']} | {s['status']} | {s['seconds']:.1f} | {s['note']} |" for s in info["stages"]]
    lines += ["", "| target | figure | goal | verdict |", "|---|---|---|---|"]
    for t in info["targets"]:
        figure = "-" if t["figure"] is None else f"{t['figure']:g}{t['unit'] if t['unit'] == 'x' else ' ' + t['unit']}"
        lines.append(f"| {t['target']} | {figure} | {t['goal']} | {t['verdict']}{': ' + t['why'] if t['why'] else ''} |")
    return "\n".join(lines) + "\n"


def write_outputs(suite: Suite, results: list[StageResult], rows: list[dict], machine: str) -> dict:
    """summary.md, summary.json, this run's rows (results.csv) and every stage's log (logs.tar.gz)."""
    info = {"date": time.strftime("%Y-%m-%d"), "machine": machine, "stages": [asdict(r) for r in results],
            "targets": evaluate_targets(rows, suite.args.quick), "rows": len(rows)}
    suite.out.mkdir(parents=True, exist_ok=True)
    (suite.out / "summary.json").write_text(json.dumps(info, indent=1) + "\n")
    (suite.out / "summary.md").write_text(summary_markdown(info))
    if rows:
        with (suite.out / "results.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    with tarfile.open(suite.out / "logs.tar.gz", "w:gz") as tar:
        for stage, text in suite.logs.items():
            data = text.encode()
            entry = tarfile.TarInfo(f"{stage}.log")
            entry.size, entry.mtime = len(data), int(time.time())
            tar.addfile(entry, io.BytesIO(data))
    return info


# ---------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/gpu_suite.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prepare-wheels", metavar="DIR", help="download the wheels the GPU image lacks into DIR, "
                   "then stop (run where the package registry answers)")
    p.add_argument("--only", default=None, metavar="A,B", help="with --prepare-wheels: only these distributions")
    p.add_argument("--wheels", default=".whl", help="the prepared wheel folder the install stage installs from")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--skip", default="", help="comma-separated stages to leave out")
    p.add_argument("--budget-s", type=float, default=480.0, help="the whole suite's time limit (seconds)")
    p.add_argument("--install", choices=("auto", "always", "never"), default="auto",
                   help="auto: install unless opad from this repository already imports")
    p.add_argument("--venv", default="/tmp/opad-gpu-venv", help="where the install stage makes its virtualenv")
    p.add_argument("--models", default="/tmp/opad-fullsize", help="the full-size models folder (written if absent)")
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu-suite-out",
                   help="summary, rows and logs go here (default $OUT, else gpu-suite-out)")
    p.add_argument("--allow-cpu", action="store_true", help="run without a GPU (checks the plumbing; the figures "
                   "are the CPU's and no target is met by them)")
    p.add_argument("--quick", action="store_true", help="small benchmark sizes (plumbing checks, not figures)")
    p.add_argument("--dry-run", action="store_true", help="print the stages and their time limits, run nothing")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    chosen = [s for s in args.stages.split(",") if s.strip()]
    skipped = [s for s in args.skip.split(",") if s.strip()]
    unknown = sorted(set(chosen + skipped) - set(STAGES))
    if unknown:
        raise SuiteError(f"unknown stage(s) {', '.join(unknown)}; the stages are {', '.join(STAGES)}")
    args.stage_list = [s for s in STAGES if s in chosen and s not in skipped]
    if not args.stage_list and not args.prepare_wheels:
        raise SuiteError("no stage left to run (--stages and --skip leave none)")
    if args.budget_s <= 0:
        raise SuiteError(f"--budget-s must be positive, got {args.budget_s:g}")
    if args.only and not args.prepare_wheels:
        raise SuiteError("--only goes with --prepare-wheels")
    return args


def prepare_wheels(args: argparse.Namespace) -> int:
    dest = Path(args.prepare_wheels)
    only = [n for n in args.only.split(",") if n.strip()] if args.only else None
    print(f"downloading the wheels the GPU image lacks into {dest} (CPython {device_wheels.TARGET_PYTHON}, "
          "manylinux x86_64):")
    manifest = device_wheels.prepare(dest, only)
    size = sum((dest / f).stat().st_size for f in manifest["files"].values()) / 2**20
    print(f"wrote {len(manifest['files'])} wheels ({size:.1f} MiB) and {device_wheels.MANIFEST} to {dest}")
    return 0


def run_suite(args: argparse.Namespace) -> int:
    if args.dry_run:
        for stage in args.stage_list:
            print(f"{stage:10s} at most {STAGE_LIMITS[stage]:4d} s")
        print(f"overall budget {args.budget_s:g} s; output to {args.out}")
        return 0
    suite = Suite(args, Path(args.out), time.monotonic() + args.budget_s)
    suite.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OPAD_RESULTS", str(HERE / "results" / "results.csv"))
    results_file = Path(os.environ["OPAD_RESULTS"])
    before = count_rows(results_file)
    results, machine = [], platform.node()
    for stage in args.stage_list:
        start = time.monotonic()
        try:
            note, status = STAGE_FUNCTIONS[stage](suite), "passed"
            if stage == "env":
                machine = note
        except TimeoutError as e:
            note, status = str(e), "timeout"
        except (StageFailed, device_wheels.WheelError) as e:
            note, status = str(e), "failed"
        except Exception as e:  # noqa: BLE001 - a bug in a stage must not cost the other stages or the summary
            note, status = f"{type(e).__name__}: {e}", "failed"
        results.append(StageResult(stage, status, time.monotonic() - start, note))
        print(f"[{stage}] {status} in {results[-1].seconds:.1f} s: {note}", flush=True)
        if stage in ("env", "install") and status != "passed":
            for later in args.stage_list[args.stage_list.index(stage) + 1:]:
                results.append(StageResult(later, "skipped", 0.0, f"{stage} did not pass"))
            break
    info = write_outputs(suite, results, result_rows(results_file, before), machine)
    print(summary_markdown(info))
    print(f"summary, rows and logs in {suite.out}")
    return 0 if all(r.status == "passed" for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        return prepare_wheels(args) if args.prepare_wheels else run_suite(args)
    except (SuiteError, device_wheels.WheelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
