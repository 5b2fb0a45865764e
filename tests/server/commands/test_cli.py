"""The ``fedfusion`` CLI and the simulation launcher."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from typer.testing import CliRunner

from server.commands.superlink import judge_run as _judge
from shared_model.cli import build_app
from shared_model.config import (
    PRESETS,
    SIMULATE_DEFAULTS,
    ConfigError,
    RunConfig,
    parse_overrides,
)
from shared_model.processes import stop_processes

ROOT = Path(__file__).resolve().parents[3]


def test_every_subcommand_explains_itself():
    app = build_app()
    runner = CliRunner()
    top = runner.invoke(app, ["--help"])
    assert top.exit_code == 0 and "simulate" in top.output
    sub = runner.invoke(app, ["simulate", "--help"], terminal_width=200)
    assert sub.exit_code == 0
    for option in ("--hospitals", "--rounds", "--run-config", "--out"):
        assert option in sub.output


def test_bad_run_config_is_refused_before_anything_starts(tmp_path):
    result = CliRunner().invoke(
        build_app(), ["simulate", "--out", str(tmp_path / "r"), "-c", "privacy.target-epsilon=-1"]
    )
    assert result.exit_code == 2
    assert "privacy.target-epsilon" in result.output
    assert not (tmp_path / "r").exists()


def test_impossible_secagg_settings_are_refused_at_start(tmp_path):
    runner = CliRunner()
    two = runner.invoke(build_app(), ["simulate", "--hospitals", "2", "--out", str(tmp_path / "a")])
    assert two.exit_code == 2 and "at least 3 hospitals" in two.output
    bad = runner.invoke(
        build_app(),
        [
            "simulate",
            "--hospitals",
            "4",
            "--out",
            str(tmp_path / "b"),
            "-c",
            "secagg.reconstruction-threshold=4",
        ],
    )
    assert bad.exit_code == 2 and "must be below num-shares" in bad.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def _settings_simulate_runs(monkeypatch, tmp_path, *args: str) -> tuple[int, int, dict]:
    """(hospitals, rounds, overrides) `fedfusion simulate ARGS` would run, without running it."""
    import server.commands.simulate as simulate

    seen: dict = {}

    def fake_run(*, hospitals, rounds, overrides, **_):
        seen.update(hospitals=hospitals, rounds=rounds, overrides=overrides)
        raise ConfigError("stopped before starting")

    monkeypatch.setattr(simulate, "run_simulation_cli", fake_run)
    result = CliRunner().invoke(build_app(), ["simulate", "--out", str(tmp_path / "r"), *args])
    assert result.exit_code == 2 and "stopped before starting" in result.output
    return seen["hospitals"], seen["rounds"], seen["overrides"]


def test_simulate_defaults_to_the_frozen_pretrained_model_that_learns(monkeypatch, tmp_path):
    hospitals, rounds, overrides = _settings_simulate_runs(monkeypatch, tmp_path)
    assert (hospitals, rounds) == (3, 15)
    run = RunConfig.from_run_config(overrides)
    assert run.model.encoder_mode == "frozen" and run.model.text_encoder == "pretrained"
    assert run.model.image_encoder == "efficientnet-lite0"
    assert (run.train.learning_rate, run.privacy.max_grad_norm) == (0.1, 2.0)
    assert run.privacy.enabled and run.secagg.enabled  # still DP and SecAgg+
    # The simulation's default only: a server's [run] table starts from the run config's.
    assert RunConfig().model.encoder_mode == "full" and RunConfig().train.learning_rate == 0.2
    *_, overridden = _settings_simulate_runs(monkeypatch, tmp_path, "-c", "train.learning-rate=0.3")
    assert overridden == {**SIMULATE_DEFAULTS, "train.learning-rate": 0.3}
    *_, preset = _settings_simulate_runs(monkeypatch, tmp_path, "--preset", "cnn-lstm-concat")
    assert preset == PRESETS["cnn-lstm-concat"]


def test_parse_overrides():
    parsed = parse_overrides(
        ['model.fusion="concat" num-rounds=5', "privacy.enabled=false", "train.pos-weight=none"]
    )
    assert parsed == {
        "model.fusion": "concat",
        "num-rounds": 5,
        "privacy.enabled": False,
        "train.pos-weight": "none",
    }
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["num-rounds"])


def test_stop_processes_stops_the_tree_and_marked_strays(tmp_path):
    marker = str(tmp_path / "private-marker")
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess,sys,time;"
            "subprocess.Popen([sys.executable,'-c','import time;time.sleep(60)']);"
            "time.sleep(60)",
        ]
    )
    # A daemon that left the tree, recognisable only by a private path on its command line.
    stray = subprocess.Popen(
        [sys.executable, "-c", "import time;time.sleep(60)", marker], start_new_session=True
    )
    time.sleep(0.5)
    tree = [parent.pid] + [c.pid for c in psutil.Process(parent.pid).children(recursive=True)]
    assert len(tree) == 2
    assert stop_processes(parent.pid, [marker], grace=3) == []
    parent.wait(5)
    stray.wait(5)
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in tree)


@pytest.mark.parametrize("recorded", ["running", "completed", "running-before"])
def test_flwr_run_is_stopped_soon_after_the_server_app_dies_unrecorded(
    tmp_path, monkeypatch, recorded
):
    """Flower notices a killed ServerApp only when its heartbeat expires (a minute on); the
    wait for `flwr run` ends a few seconds after the ServerApp process is gone, if the run
    it began was not recorded as ended. One that recorded how it ended is left to finish,
    and so is one that died before it began (its run.json is an earlier attempt's: Flower
    may start it again)."""
    from server.commands import superlink

    monkeypatch.setattr(superlink, "SERVER_APP_GONE_GRACE", 0.5)
    monkeypatch.setattr(superlink, "_WATCH_POLL", 0.1)
    run_file = tmp_path / "run.json"
    run_file.write_text(json.dumps({"status": "running"}))  # an earlier attempt's
    before = superlink._written_at(run_file)
    if recorded != "running-before":  # this attempt's ServerApp began: it rewrote run.json
        time.sleep(0.01)
        run_file.write_text(json.dumps({"status": recorded, "attempts": [1]}))
        os.utime(run_file, ns=(before + 10**7, before + 10**7))
    # a stand-in SuperLink, whose child runs "flwr-simulation"
    link = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess,sys,time;"
            "subprocess.Popen([sys.executable,'-c','import time;time.sleep(60)',"
            "'flwr-simulation']);"
            "time.sleep(60)",
        ]
    )
    flwr_run = subprocess.Popen([sys.executable, "-c", "import time;time.sleep(60)"])
    done, gone = superlink.threading.Event(), superlink.threading.Event()
    watch = superlink.threading.Thread(
        target=superlink._stop_when_server_app_gone,
        args=(flwr_run, link.pid, run_file, before, done, gone),
    )
    try:
        time.sleep(0.5)
        watch.start()
        time.sleep(0.5)
        (server_app,) = psutil.Process(link.pid).children()
        assert superlink._server_app_running(link.pid)
        server_app.kill()  # kill -9 of the ServerApp
        if recorded == "running":
            assert flwr_run.wait(10) != 0  # stopped
            assert gone.is_set()
        else:
            time.sleep(2.0)
            assert flwr_run.poll() is None and not gone.is_set()  # left to finish
    finally:
        done.set()
        watch.join(5)
        for proc in (flwr_run, link):
            proc.kill()
            proc.wait(5)


def _run_dir(tmp_path, status="completed", failures=0):
    tmp_path.mkdir()
    (tmp_path / "run.json").write_text(json.dumps({"status": status, "error": "boom"}))
    rounds = [
        {
            "round": 1,
            "failures": failures,
            "eval_failures": 0,
            "hospitals": [{"status": "failed", "reason": "ValueError: x"}] * failures,
        }
    ]
    (tmp_path / "metrics.json").write_text(json.dumps({"rounds": rounds}))
    return tmp_path


def test_judge_sees_through_flwr_run_exit_code_zero(tmp_path):
    ok = _run_dir(tmp_path / "a")
    assert _judge(0, "finished:completed", ok, tolerate_failures=False) == []
    assert "Flower reports" in _judge(0, "finished:failed", ok, False)[0]
    assert "failed: boom" in " ".join(
        _judge(0, "finished:completed", _run_dir(tmp_path / "b", status="failed"), False)
    )
    with_failures = _run_dir(tmp_path / "c", failures=1)
    assert "1 hospital replies failed" in _judge(0, "finished:completed", with_failures, False)[0]
    assert _judge(0, "finished:completed", with_failures, tolerate_failures=True) == []
    (tmp_path / "d").mkdir()
    assert "never started" in _judge(0, "finished:completed", tmp_path / "d", False)[-1]


def _simulate(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(Path(sys.executable).parent / "fedfusion"), "simulate", "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )


def _our_processes(out: Path) -> list[int]:
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if str(out) in " ".join(proc.info.get("cmdline") or []):
            found.append(proc.pid)
    return found


@pytest.mark.slow
def test_simulate_command_fails_loudly_when_hospitals_fail(tmp_path):
    """(A run that succeeds: tests/e2e/test_crash_resume.py, the simulation resumed.)"""
    out = tmp_path / "run"
    # 15 reports cannot give 3 hospitals 10 records each: every hospital raises. (The model
    # trained from scratch: no pretrained encoders to load for a run that cannot train.)
    result = _simulate(
        out,
        *("--hospitals", "3", "--rounds", "1", "--preset", "cnn-lstm-concat"),
        *("-c", "data.max-reports=15", "--no-tracking"),
    )
    assert result.returncode == 1
    assert "round 1/1 (SecAgg+)" in result.stdout  # SecAgg+ unless the run config says not
    assert "FAILED" in result.stderr and "cannot split 15 records" in result.stderr
    assert _our_processes(out) == []
    assert not (out / "tracking.json").exists() and not (tmp_path / "mlflow.db").exists()


def test_an_unknown_preset_is_refused_naming_the_known_ones(tmp_path):
    result = CliRunner().invoke(
        build_app(), ["simulate", "--preset", "resnet-bert", "--out", str(tmp_path / "r")]
    )
    assert result.exit_code == 2
    names = "cnn-lstm-concat, efficientnet-minilm-concat, efficientnet-minilm-late"
    assert names in result.output
    assert not (tmp_path / "r").exists()
