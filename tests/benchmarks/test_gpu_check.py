"""benchmarks/gpu_check.sh: its plan fits the lent GPU machine's time (15 minutes of device time
per session, the start included; at most 10 minutes per call), and its CPU dry run takes the same
steps and writes the same files as the GPU run, so the script cannot rot between GPU runs."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import pytest
import torch

from benchmarks import throughput

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
DEVICE_TIME_S = 15 * 60
MACHINE_START_S = 120  # seen: 1-2 minutes
RUN1_CALL_TIMEOUT_S = 540  # README: the device call's timeout for run 1
RUN1_STEPS = ["env", "build", "torchvision", "gpu-tests", "kernels", "throughput-b128", "throughput-rn50"]
RUN2_STEPS = [
    "env",
    "build",
    "torchvision",
    "throughput-b128-compiled",
    "throughput-b64",
    "inference",
    "dali",
]
HAS_EXTENSION = importlib.util.find_spec("dino_fast._C") is not None


def plan(name: str, *extra: str) -> dict:
    out = subprocess.run(
        ["bash", str(SCRIPT), name, "--list", *extra], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


def run_check(name: str, out: Path, **env: str) -> subprocess.CompletedProcess:
    """The dry run as a device call runs the script: bash, repo root, $OUT for the results."""
    return subprocess.run(
        ["bash", str(SCRIPT), name, "--dry-run"],
        cwd=REPO,
        env={**os.environ, "OUT": str(out), "PYTHON": sys.executable, **env},
        capture_output=True,
        text=True,
        timeout=900,
    )


def steps_of(out: Path) -> dict[str, dict]:
    return {s["name"]: s for s in json.loads((out / "gpu_check.json").read_text())["steps"]}


def test_plans_fit_the_device_time() -> None:
    run1, run2 = plan("run1"), plan("run2")
    assert [s["name"] for s in run1["steps"]] == RUN1_STEPS
    assert [s["name"] for s in run2["steps"]] == RUN2_STEPS
    budgets1 = {s["name"]: s["budget_s"] for s in run1["steps"]}
    budgets2 = {s["name"]: s["budget_s"] for s in run2["steps"]}
    # Each call's steps fit its total, and run 1's total its call's timeout with room to spare.
    assert sum(budgets1.values()) <= run1["budget_s"] <= RUN1_CALL_TIMEOUT_S - 30
    assert sum(b for name, b in budgets2.items() if name != "dali") <= run2["budget_s"]
    # Both calls and a machine start fit the session's device time, transfers left 30 s.
    assert MACHINE_START_S + run1["budget_s"] + run2["budget_s"] <= DEVICE_TIME_S - 30
    # A cold build (CMake configure + nvcc for sm_90 + the C++ sources) took 26-42 s on 2 cores.
    assert budgets1["build"] >= 2 * 42
    # The dry run is the same plan.
    for name, real in (("run1", run1), ("run2", run2)):
        dry = plan(name, "--dry-run")
        assert dry["dry_run"] and not real["dry_run"]
        assert [(s["name"], s["budget_s"]) for s in dry["steps"]] == [
            (s["name"], s["budget_s"]) for s in real["steps"]
        ]


def test_throughput_accepts_the_planned_variants() -> None:
    """The dry run times one variant per throughput step (each costs 10-20 s on a CPU); the GPU
    run's full lists must still be what benchmarks/throughput.py accepts."""
    steps = [s for name in ("run1", "run2") for s in plan(name, "--dry-run")["steps"] if "variants" in s]
    assert [s["name"] for s in steps] == [
        "throughput-b128",
        "throughput-rn50",
        "throughput-b128-compiled",
        "throughput-b64",
    ]
    for step in steps:
        preset = "rn_tiny" if step["name"] == "throughput-rn50" else "tiny"
        args = throughput.parse_args(["--device", "cpu", "--preset", preset, "--variants", *step["variants"]])
        assert args.variants == step["variants"]
        assert set(step["dry_run_variants"]) <= set(step["variants"])


@pytest.mark.slow  # ~70 s: four benchmark scripts and a pytest collection on a 2-core CPU
def test_run1_dry_run_writes_every_result(tmp_path: Path) -> None:
    proc = run_check("run1", tmp_path)
    output = proc.stdout[-4000:] + proc.stderr[-2000:]
    steps = steps_of(tmp_path)
    assert list(steps) == RUN1_STEPS
    expected = {name: "ok" for name in RUN1_STEPS}
    if not HAS_EXTENSION:
        expected["build"] = "failed"
    assert {name: s["status"] for name, s in steps.items()} == expected, output
    assert proc.returncode == (0 if HAS_EXTENSION else 1), output
    for name, step in steps.items():
        assert (tmp_path / step["log"]).is_file() and step["limit_s"] >= step["budget_s"], name
    assert "GPU CHECK run1: all steps passed" in (tmp_path / "gpu_check.log").read_text() or not HAS_EXTENSION

    env = json.loads((tmp_path / "environment.json").read_text())
    assert env["torch"] == torch.__version__ and env["device"] == "cpu" and env["dry_run"]
    assert env["results_dir"].startswith("benchmarks/results/") and env["results_dir"].endswith("-cpu")
    if HAS_EXTENSION:
        assert "torch_version" in json.loads((tmp_path / "build_info.json").read_text())
    # Without CUDA the gpu tests are only collected: the JUnit file names none as run.
    assert ET.parse(tmp_path / "gpu_tests.xml").getroot() is not None
    kernels = json.loads((tmp_path / "kernels.json").read_text())
    assert kernels["rows"] and not [r for r in kernels["rows"] if "error" in r]
    assert {r["suite"] for r in kernels["rows"]} == {"dino_loss", "ema", "clip", "vit", "dinov2"}
    b128 = json.loads((tmp_path / "throughput_b128.json").read_text())
    assert b128["complete"] and b128["variants_requested"] == ["dino_fast"]
    assert [(v["name"], v["status"]) for v in b128["variants"]] == [("dino_fast", "ok")]
    rn50 = json.loads((tmp_path / "throughput_rn50.json").read_text())
    assert rn50["complete"] and rn50["config"]["arch"] == "resnet18" and rn50["config"]["optimizer"] == "sgd"
    assert [(v["name"], v["status"]) for v in rn50["variants"]] == [("dino_fast", "ok")]
    assert "torchvision" in (tmp_path / "logs" / "torchvision.log").read_text()


@pytest.mark.slow  # ~50 s
def test_run2_dry_run_goes_on_past_a_step_cut_off(tmp_path: Path) -> None:
    """A step that runs out of its budget is recorded as such, the next step still runs, and what
    the earlier steps measured is kept."""
    proc = run_check("run2", tmp_path, GPU_CHECK_BUDGETS="throughput-b64=1")
    output = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 1, output
    steps = steps_of(tmp_path)
    assert list(steps) == RUN2_STEPS
    status = {name: s["status"] for name, s in steps.items()}
    assert status["env"] == "ok" and status["throughput-b128-compiled"] == "ok", output
    assert status["throughput-b64"] == "timeout" and "cut off" in steps["throughput-b64"]["note"]
    assert status["dali"] == "skipped" and "DALI not carried" in steps["dali"]["note"]
    assert (tmp_path / "environment.json").is_file()
    compiled = json.loads((tmp_path / "throughput_b128_compiled.json").read_text())
    assert compiled["complete"] and [(v["name"], v["status"]) for v in compiled["variants"]] == [
        ("dino_fast+compile", "ok")
    ]
    assert status["inference"] == "ok", output
    inference = json.loads((tmp_path / "inference.json").read_text())
    assert [(r["arch"], r["status"]) for r in inference["rows"]] == [
        ("vit_tiny", "ok"),
        ("vit_tiny", "ok"),
        ("resnet18", "ok"),
    ]
    assert "GPU CHECK run2: not passed: throughput-b64" in (tmp_path / "gpu_check.log").read_text()


@pytest.mark.parametrize("argv", [[], ["run3"], ["run1", "--bogus"]])
def test_bad_arguments_are_refused(argv: list[str]) -> None:
    proc = subprocess.run(["bash", str(SCRIPT), *argv], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and "gpu_check.sh" in proc.stderr


# ---------------------------------------------------------------------------------------------
# torchvision on a machine that lacks it (the ResNet steps)
# ---------------------------------------------------------------------------------------------


def without_torchvision(tmp_path: Path) -> dict[str, str]:
    """The environment of a machine without torchvision: a package of that name that fails to
    import comes first on the path (a carried install, on TORCHVISION_SITE, comes before it)."""
    blocker = tmp_path / "no_torchvision" / "torchvision"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text('raise ImportError("this machine has no torchvision")\n')
    return {
        "PYTHONPATH": f"{blocker.parent}{os.pathsep}{REPO}",
        "TORCHVISION_SITE": str(tmp_path / "site"),
        "TORCHVISION_WHEELS_DIR": str(tmp_path / "wheels"),
    }


def fake_torchvision_wheel(folder: Path, requires_torch: str) -> None:
    """A wheel named torchvision 0.0.1 that needs torch==``requires_torch``: what the install
    step does with carried wheels, without downloading torchvision."""
    folder.mkdir(parents=True)
    info = "torchvision-0.0.1.dist-info"
    files = {
        "torchvision/__init__.py": '__version__ = "0.0.1"\n',
        f"{info}/METADATA": "Metadata-Version: 2.1\nName: torchvision\nVersion: 0.0.1\n"
        f"Requires-Dist: torch (=={requires_torch})\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(folder / "torchvision-0.0.1-py3-none-any.whl", "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)


def run_only(tmp_path: Path, steps: str, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "out"
    proc = run_check("run1", out, GPU_CHECK_ONLY=steps, **env)
    return proc, steps_of(out)


def test_without_torchvision_the_resnet_steps_are_skipped_saying_how_to_carry_it(tmp_path: Path) -> None:
    proc, steps = run_only(tmp_path, "torchvision throughput-rn50", without_torchvision(tmp_path))
    output = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, output  # a step with nothing to run is no failure
    for name in ("torchvision", "throughput-rn50"):
        assert steps[name]["status"] == "skipped", output
        assert "benchmarks/torchvision_bundle.sh" in steps[name]["note"] and "carry" in steps[name]["note"]
    assert steps["kernels"]["status"] == "skipped" and steps["kernels"]["note"] == "not in GPU_CHECK_ONLY"


def test_carried_torchvision_wheels_are_installed_for_the_later_steps(tmp_path: Path) -> None:
    env = without_torchvision(tmp_path)
    fake_torchvision_wheel(Path(env["TORCHVISION_WHEELS_DIR"]), torch.__version__.split("+")[0])
    proc, steps = run_only(tmp_path, "torchvision", env)
    assert steps["torchvision"]["status"] == "ok", proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "torchvision 0.0.1 installed into" in (tmp_path / "out" / "logs" / "torchvision.log").read_text()
    # The site the install step filled is where the later steps import torchvision from.
    probe = "import torchvision; print(torchvision.__version__, torchvision.__file__)"
    site = subprocess.run(
        ["bash", "-c", f'export PYTHONPATH="$TORCHVISION_SITE:$PYTHONPATH"; "{sys.executable}" -c "{probe}"'],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert site.startswith("0.0.1 " + env["TORCHVISION_SITE"])


def test_carried_torchvision_for_another_torch_is_refused_and_not_installed(tmp_path: Path) -> None:
    env = without_torchvision(tmp_path)
    fake_torchvision_wheel(Path(env["TORCHVISION_WHEELS_DIR"]), "0.0.0")
    proc, steps = run_only(tmp_path, "torchvision throughput-rn50", env)
    assert proc.returncode == 1 and steps["torchvision"]["status"] == "failed"
    log = (tmp_path / "out" / "logs" / "torchvision.log").read_text()
    assert "built for torch 0.0.0" in log and "TORCHVISION_VERSION" in log
    assert not (Path(env["TORCHVISION_SITE"]) / "torchvision").exists()
    assert (
        steps["throughput-rn50"]["status"] == "skipped"
        and "did not install" in steps["throughput-rn50"]["note"]
    )
