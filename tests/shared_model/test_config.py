import contextlib
import math
import tomllib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared_model.config import (
    ConfigError,
    HospitalConfig,
    RunConfig,
    describe_run_config,
    flatten_toml,
)

ROOT = Path(__file__).resolve().parents[2]


def test_pyproject_app_config_is_exactly_the_defaults():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    table = flatten_toml(pyproject["tool"]["flwr"]["app"]["config"])
    assert table == RunConfig().to_run_config()
    assert RunConfig.from_run_config(table) == RunConfig()


def test_round_trip_and_overrides():
    cfg = RunConfig.from_run_config({"privacy.target-epsilon": 3, "model.fusion": "concat"})
    assert cfg.privacy.target_epsilon == 3.0 and isinstance(cfg.privacy.target_epsilon, float)
    assert cfg.model.fusion == "concat"
    assert RunConfig.from_run_config(cfg.to_run_config()) == cfg


@pytest.mark.parametrize(
    ("run_config", "named"),
    [
        ({"privacy.target-epsilonn": 3.0}, "privacy.target-epsilonn"),
        ({"num-rounds": "3"}, "num-rounds"),
        ({"num-rounds": True}, "num-rounds"),
        ({"privacy.enabled": 1}, "privacy.enabled"),
        ({"privacy.delta": "small"}, "privacy.delta"),
        ({"privacy.delta": float("nan")}, "privacy.delta"),
        ({"model.fusion": "sum"}, "model.fusion"),
        ({"train.batch-size": 0}, "train.batch-size"),
        ({"privacy.target-epsilon": 0.0}, "privacy.target-epsilon"),
        ({"model.text-heads": 3}, "model.text-heads"),
        ({"model.image-size": 40}, "model.image-size"),
        ({"model.labels": "a|a"}, "model.labels"),
        ({"server.strategy": "fedprox"}, "server.proximal-mu"),
    ],
)
def test_bad_run_config_names_the_key(run_config, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        RunConfig.from_run_config(run_config)


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match=r"Did you mean 'model\.fusion'"):
        RunConfig.from_run_config({"model.fuson": "concat"})


@given(
    st.dictionaries(
        st.text(min_size=1, max_size=30), st.integers() | st.text() | st.booleans(), max_size=4
    )
)
def test_parser_raises_only_config_errors(mapping):
    with contextlib.suppress(ConfigError):
        RunConfig.from_run_config(mapping)


def test_hospital_config():
    cfg = HospitalConfig.from_node_config({"partition-id": 1, "num-partitions": 3})
    assert cfg.name == "hospital-1"
    own = HospitalConfig.from_node_config(
        {"hospital-id": "st-mary", "data-manifest": "/d/m.csv", "max-epsilon": 4, "state-dir": "/s"}
    )
    assert own.name == "st-mary" and own.max_epsilon == 4.0
    with pytest.raises(ConfigError, match="data-manifest"):
        HospitalConfig.from_node_config({})
    with pytest.raises(ConfigError, match="partition-id"):
        HospitalConfig.from_node_config({"partition-id": 3, "num-partitions": 3})
    with pytest.raises(ConfigError, match="unknown node config key 'max-eps'"):
        HospitalConfig.from_node_config({"partition-id": 0, "num-partitions": 1, "max-eps": 1.0})


def test_hospital_threads_and_device():
    sim = HospitalConfig.from_node_config({"partition-id": 0, "num-partitions": 2})
    assert sim.simulated and sim.torch_threads() == 1  # simulated hospitals share the machine
    own = HospitalConfig.from_node_config({"data-manifest": "/d/m.csv", "state-dir": "/s"})
    assert not own.simulated and own.torch_threads() == 0  # all cores of its own machine
    four = HospitalConfig.from_node_config(
        {"data-manifest": "/d/m.csv", "state-dir": "/s", "threads": 4}
    )
    assert four.torch_threads() == 4
    for ok in ("cpu", "cuda", "cuda:1", "auto"):
        assert (
            HospitalConfig.from_node_config(
                {"data-manifest": "/d", "state-dir": "/s", "device": ok}
            ).device
            == ok
        )
    with pytest.raises(ConfigError, match=r"'device'.*'gpu'"):
        HospitalConfig.from_node_config({"data-manifest": "/d", "state-dir": "/s", "device": "gpu"})
    with pytest.raises(ConfigError, match="threads"):
        HospitalConfig.from_node_config({"data-manifest": "/d", "state-dir": "/s", "threads": -1})


def test_every_key_is_documented():
    for key, _default, help_text in describe_run_config():
        assert help_text.strip(), key


def test_hospital_config_file(tmp_path):
    (tmp_path / "hospital.toml").write_text(
        '[hospital]\nhospital-id = "st-mary"\ndata-manifest = "data/manifest.csv"\n'
        'max-epsilon = 3.0\nstate-dir = "state"\n'
    )
    cfg = HospitalConfig.from_node_config(
        {"config-file": str(tmp_path / "hospital.toml"), "max-epsilon": 2.0}
    )
    assert cfg.name == "st-mary"
    assert cfg.data_manifest == str(tmp_path / "data" / "manifest.csv")
    assert cfg.max_epsilon == 2.0  # the node config's own key wins
    (tmp_path / "bad.toml").write_text('[hospital]\nmax-epsilon = "lots"\n')
    with pytest.raises(ConfigError, match="max-epsilon"):
        HospitalConfig.from_node_config({"config-file": str(tmp_path / "bad.toml")})
    with pytest.raises(ConfigError, match="cannot read"):
        HospitalConfig.from_node_config({"config-file": str(tmp_path / "none.toml")})


@pytest.mark.parametrize(
    ("settings", "hospitals", "expected"),
    [
        ({}, 3, (3, 2)),
        ({}, 4, (4, 3)),
        ({}, 10, (10, 7)),  # by default every hospital shares with every other
        ({}, 100, (100, 67)),
        ({"sparse": True}, 7, (7, 5)),  # 2 * ceil(log2 n) + 1 >= n up to 7: every hospital
        ({"sparse": True}, 8, (7, 5)),
        ({"sparse": True}, 10, (9, 6)),
        ({"sparse": True}, 20, (11, 8)),
        ({"sparse": True}, 100, (15, 10)),
        ({"sparse": True}, 1000, (21, 14)),
        ({"num_shares": 5}, 10, (5, 4)),
        ({"num_shares": 5, "reconstruction_threshold": 3}, 10, (5, 3)),
    ],
)
def test_secagg_defaults_are_sane_for_3_to_1000_hospitals(settings, hospitals, expected):
    from shared_model.config import SecAggConfig

    shares, threshold = SecAggConfig(**settings).resolve(hospitals)
    assert (shares, threshold) == expected
    assert 2 <= threshold < shares <= hospitals and 2 * threshold > shares


@pytest.mark.parametrize("hospitals", [*range(3, 130), 500, 1000, 1024, 1025, 5000])
def test_secagg_sparse_shares_are_odd_and_within_every_hospitals_log_floor(hospitals):
    """The server's sparse plan is one a hospital allowing a sparse graph accepts."""
    from shared_model.config import SecAggConfig

    shares, threshold = SecAggConfig(sparse=True).resolve(hospitals)
    floor = 2 * math.ceil(math.log2(hospitals)) + 1
    assert shares == min(hospitals, floor)
    assert shares == hospitals or (shares % 2 == 1 and shares >= 7)
    assert threshold == max(2, math.ceil(2 * shares / 3)) and 2 * threshold > shares


@pytest.mark.parametrize(
    ("settings", "hospitals", "message"),
    [
        ({}, 2, "at least 3 hospitals"),
        ({"num_shares": 6}, 5, "6 shares for only 5"),
        ({"reconstruction_threshold": 4}, 4, "must be below num-shares"),
        ({"num_shares": 5, "reconstruction_threshold": 1}, 8, "at least 2"),
        # both halves of one hospital's secrets from disjoint neighbours: hospitals refuse
        ({"num_shares": 7, "reconstruction_threshold": 3}, 9, r"not above half .* at least 4"),
        # Flower 1.42 would build a graph of 21 with 20 shares: IndexError at every hospital
        ({"num_shares": 20}, 50, r"20 is even; .* \(use 21\)"),
    ],
)
def test_impossible_secagg_combinations_are_refused(settings, hospitals, message):
    from shared_model.config import SecAggConfig

    with pytest.raises(ConfigError, match=message):
        SecAggConfig(**settings).resolve(hospitals)


def test_secagg_plan_never_samples_more_hospitals_than_are_connected():
    run = RunConfig.from_run_config({"server.fraction-train": 0.5})
    assert run.secagg_plan(10) == (5, 5, 4)
    assert run.secagg_plan(40) == (20, 20, 14)
    sparse = RunConfig.from_run_config({"server.fraction-train": 0.5, "secagg.sparse": True})
    assert sparse.secagg_plan(40) == (20, 11, 8)  # 2 * ceil(log2 20) + 1 of 20
    assert run.secagg_plan(4) == (3, 3, 2)  # Flower's minimum of 3 per round
    with pytest.raises(ConfigError, match="at least 3 hospitals per round, got 2"):
        run.secagg_plan(2)  # not silently planned as 3: that would wait forever


@pytest.mark.parametrize(
    ("node_config", "accepted"),
    [
        ({"partition-id": 0, "num-partitions": 3}, True),  # simulated: public data
        ({"partition-id": 0, "num-partitions": 3, "secagg-sparse-shares": False}, False),
        ({"data-manifest": "m.csv", "state-dir": "s"}, False),  # its own data: all, never fewer
        ({"data-manifest": "m.csv", "state-dir": "s", "secagg-min-shares": 9}, True),
        ({"data-manifest": "m.csv", "state-dir": "s", "secagg-sparse-shares": True}, True),
        (
            {"data-manifest": "m.csv", "state-dir": "s", "secagg-min-shares": 9}
            | {"secagg-sparse-shares": False},
            False,
        ),
    ],
)
def test_only_a_hospitals_own_file_lets_real_data_share_keys_with_some_hospitals(
    node_config, accepted
):
    assert HospitalConfig.from_node_config(node_config).sparse_shares_accepted is accepted
