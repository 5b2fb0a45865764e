"""`python -m benchmarks --suite gpu`: one line without a GPU, every part on the CPU when asked."""

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from typer.testing import CliRunner

from benchmarks.cli import app
from benchmarks.gpu import DeviceMemory
from benchmarks.report import Measurement

ROOT = Path(__file__).resolve().parents[2]
# `python -m benchmarks ARGS`, then which of these modules it loaded, on a line of its own
PROBE = (
    "import atexit, runpy, sys\n"
    "heavy = ('torch', 'flwr', 'opacus', 'ray', 'benchmarks.dp', 'benchmarks.gpu')\n"
    "atexit.register(lambda: print('loaded:', [m for m in heavy if m in sys.modules]))\n"
    "sys.argv = ['python -m benchmarks', *sys.argv[1:]]\n"
    "runpy.run_module('benchmarks', run_name='__main__')\n"
)


def _bench(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """Run the probe; past ``timeout``, stop it and everything it started (a SuperLink)."""
    with subprocess.Popen(
        [sys.executable, "-c", PROBE, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            tree = psutil.Process(proc.pid)
            victims = [tree, *tree.children(recursive=True)]  # a SuperLink has its own session
            for victim in victims:
                with contextlib.suppress(psutil.NoSuchProcess):
                    victim.kill()
            psutil.wait_procs(victims, timeout=10)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_without_a_gpu_the_suite_says_so_in_one_line_and_ends_at_once():
    """No GPU (none here; CUDA_VISIBLE_DEVICES hides one elsewhere): exit 0, one line."""
    started = time.monotonic()
    out = _bench("--suite", "gpu", env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    took = time.monotonic() - started
    assert out.returncode == 0, out.stderr
    *said, loaded = (out.stdout + out.stderr).splitlines()
    assert len(said) == 1 and said[0].startswith("bench gpu: no CUDA GPU here")
    assert "python -m benchmarks --suite gpu --device cpu" in said[0]
    assert loaded == "loaded: ['torch']"  # asked torch whether there is a GPU, nothing more
    assert took < 20  # about 2 s: the import of torch


def test_help_loads_no_torch():
    out = _bench("--help")
    assert out.returncode == 0 and "--suite" in out.stdout and "gpu" in out.stdout
    assert out.stdout.splitlines()[-1] == "loaded: []"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_gpu_asked_for_where_there_is_none_measures_on_the_cpu_warned(
    tmp_path, monkeypatch, caplog
):
    import benchmarks.dp

    seen = []

    def measured(**kwargs):
        seen.append(kwargs["device"])
        return [Measurement.of("dp-step/default/none", {}, [0.03], "s")]

    monkeypatch.setattr(benchmarks.dp, "run_dp_suite", measured)
    monkeypatch.setattr(benchmarks.dp, "run_memory_bench", measured)
    result = CliRunner().invoke(app, ["--suite", "dp", "--device", "cuda", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert seen == ["cpu", "cpu"]
    (warned,) = [r.getMessage() for r in caplog.records if r.name == "fedfusion.device"]
    assert warned.startswith("--device = 'cuda': ") and "runs on the CPU" in warned


def test_a_device_that_cannot_be_is_refused_naming_the_option(tmp_path, monkeypatch):
    result = CliRunner().invoke(app, ["--suite", "gpu", "--device", "gpu", "-o", str(tmp_path)])
    assert result.exit_code == 2
    assert "--device = 'gpu': expected cpu, cuda, cuda:N or auto" in result.output
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine of 2 GPUs
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    result = CliRunner().invoke(app, ["--suite", "dp", "--device", "cuda:7", "-o", str(tmp_path)])
    assert result.exit_code == 2 and "--device = 'cuda:7': this machine has 2" in result.output
    assert "Traceback" not in result.output and not list(tmp_path.iterdir())


def test_device_memory_counts_what_grew_beyond_the_start(monkeypatch):
    """What the federation checks: the hospitals' processes took GPU memory."""
    used = iter([1.0e9, 1.2e9, 3.5e9] + [2.0e9] * 100)  # the start, then samples
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda _d: (8e9 - next(used), 8e9))
    with DeviceMemory("cuda:0", interval=0.01) as memory:
        time.sleep(0.2)
    assert memory.start == 1.0e9 and memory.peak == 3.5e9
    assert memory.grown == pytest.approx(2.5e9)


@pytest.mark.slow
def test_every_part_runs_on_the_cpu(tmp_path):
    """The suite cannot rot where no GPU is: each part runs, at its smallest, on the CPU."""
    # about 60 s on 2 idle cores; a loaded CI machine takes twice that
    out = _bench("--suite", "gpu", "--device", "cpu", "--out", str(tmp_path), timeout=480)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    data = json.loads((tmp_path / "gpu-cpu.json").read_text())
    assert data["failures"] == [] and not (tmp_path / "gpu.json").exists()
    assert {"torch", "flwr", "opacus", "device"} <= set(data["machine"])
    names = [e["name"] for e in data["entries"]]
    for model in ("default", "lora"):
        assert f"dp-step/{model}/none" in names and f"peak-memory/{model}/bk" in names
    assert {"federation/round-1", "federation/round-2", "predict/per-record-warm"} <= set(names)
    bk = next(e for e in data["entries"] if e["name"] == "dp-step/default/bk")
    assert bk["baseline"] == "dp-step/default/none" and bk["config"]["device"] == "cpu"
    assert "| dp-step/lora/bk |" in out.stdout and "Device: cpu" in out.stdout
    assert "bench gpu: " in out.stderr  # progress, as the other suites show it
