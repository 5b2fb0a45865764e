"""The benchmark's arithmetic: warm-up left out, medians, ratios against the baseline."""

import json

import pytest

from benchmarks.federation import _Run
from benchmarks.report import Measurement, table, write_results
from shared_model.config import RunConfig


def rounds(seconds, up=1000, key=100):
    return [
        {
            "round": i,
            "seconds": s,
            "hospitals": [{"bytes_up": up, "bytes_down": 2 * up, "key_bytes_up": key}] * 2,
        }
        for i, s in enumerate(seconds)
    ]


def test_baseline_and_warm_up_rounds_are_left_out():
    run = _Run.from_rounds(rounds([50.0, 40.0, 3.0, 5.0, 4.0]))
    assert run.seconds == [3.0, 5.0, 4.0]  # round 0 (baseline) and round 1 (warm-up) dropped
    assert run.up == [1000.0] * 6 and run.key_up == [100.0] * 6
    with pytest.raises(RuntimeError, match="no training round"):
        _Run.from_rounds(rounds([50.0, 40.0]))


def test_ratio_and_target_against_a_baseline(tmp_path):
    base = Measurement.of("plain", {}, [2.0, 4.0, 3.0], "s")
    fast = Measurement.of("secagg", {}, [3.3, 3.6, 10.0], "s").against(base, 1.2)
    slow = Measurement.of("deployed", {}, [9.0], "s").against(base, 2.0)
    assert (base.median, base.min, base.max, base.samples) == (3.0, 2.0, 4.0, 3)
    assert fast.ratio == pytest.approx(1.2) and fast.met
    assert slow.ratio == pytest.approx(3.0) and slow.met is False
    text = table([base, fast, slow])
    assert "<= 2x: MISSED" in text and "<= 1.2x: met" in text
    json_path, md_path = write_results([base, fast, slow], tmp_path)
    data = json.loads(json_path.read_text())
    entry = data["entries"][2]
    assert {"name", "config", "median", "min", "max", "unit", "ratio", "baseline"} <= set(entry)
    assert entry["baseline"] == "plain" and data["machine"]["cores"] >= 1
    assert "MISSED" in md_path.read_text()
    with pytest.raises(ValueError, match="no samples"):
        Measurement.of("empty", {}, [], "s")


def test_utility_summary_targets_and_files(tmp_path):
    from benchmarks.utility import (
        GRID,
        UTILITY_CONFIGS,
        paired_difference,
        search_grid,
        summarize_utility,
        utility_targets,
        write_utility,
    )

    def run(auroc, normal, missing=None):
        metrics = {"auroc": auroc, "auroc.normal": normal, "auroc.effusion": 0.9}
        early = {"auroc": 0.5, "auroc.normal": 0.5, "auroc.effusion": 0.5}
        last = {"round": 1, "eval_metrics": metrics}
        for name, value in (missing or {}).items():
            last[f"eval_metrics_{name}"] = {
                "auroc": value,
                "auroc.normal": value,
                "auroc.effusion": 0.9,
            }
        return [{"round": 0, "eval_metrics": early}, last], 30.0

    scores = {  # configuration name -> macro AUROC over 3 seeds
        "small: centralized, non-private": (0.90, 0.92, 0.88),
        "small: federated, DP eps=8, SecAgg+": (0.86, 0.87, 0.85),
        "small: image only, DP eps=8, SecAgg+": (0.80, 0.81, 0.79),
        "frozen: centralized, non-private": (0.70, 0.80, 0.72),
        "frozen: federated, DP eps=8, SecAgg+": (0.74, 0.77, 0.71),
        "frozen: image only, DP eps=8, SecAgg+": (0.75, 0.78, 0.70),  # fused -0.003
        "frozen: text only, DP eps=8, SecAgg+": (0.71, 0.72, 0.70),
    }
    removed = {  # fused models: with the text / the image removed, per seed
        "small": [{"without-text": 0.795, "without-image": 0.6}] * 3,
        "frozen": [{"without-text": v, "without-image": 0.7} for v in (0.72, 0.77, 0.70)],
    }
    tuning = [{"point": {"train.learning-rate": 0.1}, "validation_auroc": 0.7}]
    entries = [
        summarize_utility(
            c,
            [
                run(a, 0.7, removed[c.mode][i] if c.branch == "fused" and c.secagg else None)
                for i, a in enumerate(scores.get(f"{c.mode}: {c.name}", (0.7, 0.7, 0.7)))
            ],
            {"train.learning-rate": 0.1},
            tuning,
            seeds=(3, 4, 5),
        )
        for c in UTILITY_CONFIGS
        if c.mode in removed
    ]
    central = entries[0]
    assert central["macro_auroc_mean"] == pytest.approx(0.90)
    assert central["macro_auroc_std"] == pytest.approx(0.01633, rel=1e-3)
    assert central["macro_auroc_by_seed"] == {"3": 0.90, "4": 0.92, "5": 0.88}
    assert central["per_label_auroc"]["normal"] == {
        "mean": pytest.approx(0.7),
        "std": pytest.approx(0),
    }
    assert central["rounds"] == 1 and central["auroc_by_round"] == [0.5, 0.9]
    assert {central["privacy"], central["secagg"], central["branch"]} == {"none", "off", "fused"}
    assert central["missing"] == {}  # evaluated without a modality: the fused DP model only
    fused = next(e for e in entries if e["name"] == "frozen: federated, DP eps=8, SecAgg+")
    assert fused["missing"]["without-text"]["macro_auroc_by_seed"]["4"] == 0.77
    targets = {t: (v, m) for t, v, m in utility_targets(entries)}
    small = {t.split(": ", 1)[1]: vm for t, vm in targets.items() if t.startswith("small")}
    frozen = {t.split(": ", 1)[1]: vm for t, vm in targets.items() if t.startswith("frozen")}
    ratio = "federated DP eps=8 + SecAgg+ >= {}x centralized non-private"
    assert small[ratio.format(0.85)] == (pytest.approx(0.86 / 0.90), True)
    assert frozen[ratio.format(0.95)] == (pytest.approx(0.74 / 0.74), True)
    spread = "centralized non-private, max - min over seeds <= 0.05"
    assert small[spread] == (pytest.approx(0.04), True)
    assert spread not in frozen  # a target for the model trained from scratch only
    pair = "{} (paired seeds, DP eps=8, SecAgg+)"
    # seed by seed: fused - image = -0.01, -0.01, +0.01
    assert frozen[pair.format("fused - image only >= -0.005")] == (pytest.approx(-0.01 / 3), True)
    assert small[pair.format("fused - image only >= -0.005")] == (pytest.approx(0.06), True)
    assert frozen[pair.format("fused - text only >= 0")] == (pytest.approx(0.03), True)
    # text removed: 0.72, 0.77, 0.70 against image only 0.75, 0.78, 0.70
    assert frozen[pair.format("fused, text removed - image only >= -0.01")] == (
        pytest.approx(-0.04 / 3),
        False,
    )
    assert small[pair.format("fused, image removed - text only >= -0.01")] == (
        pytest.approx(-0.1),
        False,
    )
    # a comparison whose configurations were not run is reported, never met
    no_text = [e for e in entries if "text only" not in e["name"]]
    assert (f"frozen: {pair.format('fused - text only >= 0')}", None, False) in utility_targets(
        no_text
    )
    low_high = paired_difference({"0": 0.8, "1": 0.9, "2": 0.85}, {"0": 0.7, "1": 0.7, "2": 0.7})
    assert low_high is not None and low_high[0] == pytest.approx(0.15)
    assert low_high[1] < 0.15 < low_high[2] and low_high[3] == 3
    assert paired_difference({"0": 0.8}, {"0": 0.7}) is None  # one seed: no interval
    assert paired_difference({"0": 0.8, "1": 0.9}, {"2": 0.7, "3": 0.7}) is None  # unpaired
    json_path, md_path, png_path = write_utility(entries, tmp_path, {"rounds": 1})
    data = json.loads(json_path.read_text())
    assert len(data["entries"]) == len(entries) and len(data["targets"]) == len(targets)
    assert data["settings"] == {"rounds": 1} and len(data["fusion"]) == 8
    assert {
        "name",
        "model",
        "branch",
        "privacy",
        "secagg",
        "rounds",
        "macro_auroc_mean",
        "macro_auroc_std",
        "macro_auroc_by_seed",
        "missing",
        "wall_time_s",
        "tuned",
        "tuning",
    } <= set(data["entries"][0])
    md = md_path.read_text()
    assert "0.956, met" in md and "lr 0.1: 0.700" in md and "MISSED" in md
    assert "| frozen | fused - image only | -0.005 | -0.003 |" in md
    assert png_path.stat().st_size > 1000
    # the search: learning rate x clipping norm with DP, the learning rate alone without
    dp = next(c for c in UTILITY_CONFIGS if c.privacy == "8" and c.mode == "frozen")
    assert len(search_grid(dp, GRID)) == 4
    frozen_central = next(c for c in UTILITY_CONFIGS if c.mode == "frozen")
    assert search_grid(frozen_central, GRID) == [
        {"train.learning-rate": lr} for lr in GRID["train.learning-rate"]
    ]
    # the model trained from scratch: fixed settings, no search
    assert all(search_grid(c, GRID) == [] for c in UTILITY_CONFIGS if c.mode == "small")


def test_tree_memory_sees_a_grandchild_allocate():
    import subprocess
    import sys

    from benchmarks.federation import TreeMemory

    def peak(code: str) -> float:
        """A small process whose own child runs ``code``: its tree's peak memory."""
        child = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {code!r}])"
        proc = subprocess.Popen([sys.executable, "-c", child])
        with TreeMemory(interval=0.1, root=proc.pid) as memory:
            proc.wait()
        return memory.peak

    idle = peak("import time; time.sleep(1.5)")
    grown = peak("b = b'x' * (300 * 2**20); import time; time.sleep(1.5)")  # pages touched
    assert grown - idle > 250 * 2**20


def test_one_dp_step_measurement_in_its_own_process():
    from benchmarks.dp import _run_one

    spec = {
        "model": "default",
        "overrides": {"model.image-size": 32, "model.embed-dim": 16},
        "device": "cpu",
        "threads": 1,
        "batch": 16,
        "physical": 8,
        "warmup": 1,
        "steps": 2,
        "secure_noise": True,
        "mode": "auto",
    }
    got = _run_one(spec)
    assert got["resolved"] == "bk" and len(got["times"]) == 2
    assert all(t > 0 for t in got["times"]) and got["peak_memory"] > got["train_memory"] > 0


def test_the_dp_suite_holds_the_defaults_to_the_target_and_keeps_the_extras(monkeypatch):
    """The headline is the default model at the default batch with secure noise, DP held
    to 1.2x; make simulate's frozen-feature head is reported; batch 64 rows are extras."""
    import benchmarks.dp

    specs = []

    def fake(spec):
        specs.append(spec)
        slow = {"none": 1.0, "bk": 1.1}.get(spec.get("name", spec["mode"]), 1.5)
        return {"times": [slow], "peak_memory": 2.0, "train_memory": 1.0}

    monkeypatch.setattr(benchmarks.dp, "_run_one", fake)
    got = {m.name: m for m in benchmarks.dp.run_dp_suite(echo=lambda _: None, repeats=1)}
    batch = RunConfig().train.batch_size
    head = got["dp-step/default/bk"]
    assert head.config["batch"] == batch and head.config["secure_noise"] is True
    assert head.target == "<= 1.2x" and head.met and head.baseline == "dp-step/default/none"
    assert got["dp-step/default/bk-prng"].config["secure_noise"] is False
    frozen = got["dp-step/simulate/bk"]
    assert frozen.config["batch"] == batch and frozen.target == "" and frozen.ratio == 1.1
    assert frozen.config["overrides"]["model.encoder-mode"] == "frozen"
    for model in ("default", "lora"):
        for mode in ("hooks", "ghost", "functorch", "ew", "bk"):
            extra = got[f"dp-step/{model}-batch-64/{mode}"]
            assert extra.config["batch"] == 64 and extra.target == ""
    assert {s["mode"] for s in specs if s["model"] == "default" and s["batch"] == batch} == {
        "none",
        "bk",
    }


def test_a_failed_part_is_recorded_and_the_others_are_kept(tmp_path, monkeypatch):
    """A part that fails late (here: memory) loses nothing the earlier parts measured."""
    from typer.testing import CliRunner

    import benchmarks.dp
    from benchmarks.cli import app

    step = Measurement.of("dp-step/default/none", {}, [0.03], "s")
    monkeypatch.setattr(benchmarks.dp, "run_dp_suite", lambda **_: [step])

    def broken(**_):
        raise RuntimeError("the memory run failed: out of luck")

    monkeypatch.setattr(benchmarks.dp, "run_memory_bench", broken)
    result = CliRunner().invoke(app, ["--suite", "dp", "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "FAILED (memory): the memory run failed: out of luck" in result.output
    json_path = tmp_path / "dp.json"
    data = json.loads(json_path.read_text())
    assert [e["name"] for e in data["entries"]] == ["dp-step/default/none"]
    assert data["failures"] == ["memory: the memory run failed: out of luck"]
    assert "**FAILED** memory: the memory run failed" in (tmp_path / "dp.md").read_text()


def test_phantom_calibration_judges_the_anchor_band(monkeypatch):
    """The macro AUROC's median is checked against 0.80-0.90; per-label figures follow."""
    import benchmarks.phantoms as phantoms

    finals = iter([0.78, 0.84, 0.95])
    seen = []

    def fake_run(out, hospitals, rounds, overrides):
        seen.append((hospitals, overrides))
        auroc = next(finals)
        return [{"eval_metrics": {"auroc": auroc, "auroc.nodule": auroc - 0.1}}]

    monkeypatch.setattr(phantoms, "simulate_run", fake_run)
    macro, nodule = phantoms.run_phantom_calibration(echo=lambda _: None)
    assert all(h == 1 and o["model.branches"] == "image" for h, o in seen)
    assert not any(o["privacy.enabled"] or o["secagg.enabled"] for _, o in seen)
    assert [o["seed"] for _, o in seen] == [0, 1, 2]
    assert macro.median == 0.84 and macro.met and macro.target == "0.80 to 0.90"
    assert nodule.name.endswith("auroc/nodule") and nodule.median == pytest.approx(0.74)

    finals = iter([0.91, 0.93, 0.95])
    (macro, _) = phantoms.run_phantom_calibration(echo=lambda _: None)
    assert macro.median == 0.93 and macro.met is False


@pytest.mark.slow  # trains federations for real
def test_the_quick_utility_run_end_to_end(tmp_path):
    """`make bench-utility ARGS=--quick`: search, seeds, results files, on real training."""
    from benchmarks.utility import quick_plan, run_utility_bench, utility_settings, write_utility

    plan = quick_plan()
    lines = []
    entries = run_utility_bench(modes=("frozen",), echo=lines.append, **plan)
    assert [e["name"].split(": ", 1)[1] for e in entries] == list(plan["names"])
    assert any("validation split" in line for line in lines)
    central = entries[0]
    assert central["rounds"] == 3 and len(central["auroc_by_round"]) == 4
    assert central["macro_auroc_mean"] > 0.6  # 3 non-private rounds learn something
    assert all(len(e["tuning"]) == 1 and e["tuning"][0]["validation_auroc"] for e in entries)
    # the fused model, evaluated again with each modality removed from every record
    missing = entries[1]["missing"]
    assert set(missing) == {"without-text", "without-image"}
    without_image = missing["without-image"]["macro_auroc_by_seed"]["0"]
    assert without_image != pytest.approx(entries[1]["macro_auroc_mean"], abs=1e-6)
    json_path, md_path, png_path = write_utility(entries, tmp_path, utility_settings(plan))
    assert json.loads(json_path.read_text())["settings"]["rounds"] == 3
    assert png_path.stat().st_size > 1000 and "MISSED" in md_path.read_text()


def test_the_dp_step_breakdown_names_every_part_of_a_bk_step():
    """python -m benchmarks.dp_step --breakdown: each layer type, the noise, the passes."""
    from benchmarks.dp_step import breakdown

    spec = {
        "model": "default",
        "overrides": {"model.image-size": 32, "model.embed-dim": 16},
        "device": "cpu",
        "threads": 1,
        "batch": 8,
        "warmup": 1,
        "steps": 1,
        "secure_noise": True,
        "mode": "bk",
    }
    ms = breakdown(spec, steps=3)["ms"]
    parts = {
        "forward",
        "backward to the layer outputs",
        "convolutions, per-example gradients",
        "convolutions, ghost norm + clipped sum",
        "linear layers",
        "embeddings",
        "normalization layers",
        "noise from the CSPRNG",
        "optimizer step",
    }
    assert parts <= set(ms) and all(ms[p] > 0 for p in parts)
    assert sum(ms[p] for p in parts) < ms["step, bk"]
