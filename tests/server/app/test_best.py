"""The server keeps the best trained round (pooled held-out macro AUROC) as the run goes."""

import json

from safetensors.torch import load_file

from server.app.best import BEST_FILE, BEST_MODEL
from server.app.store import RunStore
from tests.support.runs import fake_run


def _best(root):
    return json.loads((root / BEST_FILE).read_text())


def test_the_best_round_and_its_model_are_kept_beside_the_final_one(tmp_path):
    # Prepare: round 0 (untrained) scores best of all, then 1 < 3 < 2 > 4
    fake_run(tmp_path, [4.0, 0.5, 2.0, 1.0, 0.2])

    # Assert
    best = _best(tmp_path)
    assert best["round"] == 2 and best["metric"] == "auroc" and best["split"] == "test"
    kept = load_file(str(tmp_path / BEST_MODEL))
    round_2 = load_file(str(tmp_path / "checkpoints" / "round-0002.safetensors"))
    final = load_file(str(tmp_path / "global_model.safetensors"))
    assert all((kept[k] == round_2[k]).all() for k in round_2)
    assert any((kept[k] != final[k]).any() for k in final)


def test_a_round_without_an_evaluation_is_not_a_candidate(tmp_path):
    fake_run(tmp_path, [None, 1.0, None, 0.5])
    assert _best(tmp_path)["round"] == 1


def test_a_resumed_run_drops_a_best_round_it_no_longer_has(tmp_path):
    # Prepare: round 2 was best, then the server died before round 2's record was final
    fake_run(tmp_path, [None, 1.0, 3.0])
    assert _best(tmp_path)["round"] == 2
    info = json.loads((tmp_path / "run.json").read_text())
    info["status"] = "running"
    (tmp_path / "run.json").write_text(json.dumps(info))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    metrics["rounds"] = metrics["rounds"][:2]  # round 2's record never landed
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    (tmp_path / "checkpoints" / "round-0002.safetensors").unlink()

    # Execute
    store = RunStore(tmp_path)
    point = store.begin(info["config"], info["base_hash"])

    # Assert: the best is the best of what the resumed run still holds
    assert point is not None and point.round == 1
    assert _best(tmp_path)["round"] == 1
    kept = load_file(str(tmp_path / BEST_MODEL))
    round_1 = load_file(str(tmp_path / "checkpoints" / "round-0001.safetensors"))
    assert all((kept[k] == round_1[k]).all() for k in round_1)
    store.release()
