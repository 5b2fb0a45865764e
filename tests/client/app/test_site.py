"""Where a hospital trains: a GPU that is not there is the CPU, warned, with the key named."""

import logging

import pytest
import torch

from client.app.site import open_site
from shared_model.config import SIM_DEVICE_ENV, ConfigError, HospitalConfig, RunConfig


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_hospital_asking_for_a_gpu_where_there_is_none_trains_on_the_cpu(tmp_path, caplog):
    hospital = HospitalConfig(partition_id=0, num_partitions=3, device="cuda:1")
    run = RunConfig.from_run_config({"output-dir": str(tmp_path), "data.max-reports": 60})
    with caplog.at_level(logging.WARNING, logger="fedfusion.device"):
        site = open_site(hospital, run)
    assert site.device == torch.device("cpu")
    warned = [r.getMessage() for r in caplog.records if r.name == "fedfusion.device"]
    assert len(warned) == 1 and warned[0].startswith("hospital.device = 'cuda:1': ")


def test_a_simulation_chooses_its_hospitals_device_and_no_other_hospitals(monkeypatch):
    """`fedfusion simulate`'s hospitals hold only a partition; one's own setting wins."""
    monkeypatch.setenv(SIM_DEVICE_ENV, "cuda")
    simulated = {"partition-id": 0, "num-partitions": 3}
    assert HospitalConfig.from_node_config(simulated).device == "cuda"
    assert HospitalConfig.from_node_config({**simulated, "device": "cpu"}).device == "cpu"
    own = {"data-manifest": "/d/m.csv", "state-dir": "/s"}
    assert HospitalConfig.from_node_config(own).device == "cpu"
    monkeypatch.setenv(SIM_DEVICE_ENV, "gpu")
    with pytest.raises(ConfigError, match=r"'device'.*'gpu'"):
        HospitalConfig.from_node_config(simulated)


def _load(manifest, state_dir):
    """hospital_records as a fresh ClientApp process would call it (no in-process cache)."""
    from client.app.site import hospital_records
    from shared_model.config import HospitalConfig, RunConfig

    hospital_records.cache_clear()
    node = {"data-manifest": str(manifest), "hospital-id": "h", "state-dir": str(state_dir)}
    run = RunConfig()
    hospital = HospitalConfig.from_node_config(node)
    return hospital_records(hospital, run.model, run.data, run.seed).images


def test_decoded_images_are_kept_for_the_next_process_and_redone_when_a_file_changes(
    tmp_path, monkeypatch
):
    import os

    import client.app.site
    from shared_model.datasets.export import write_manifest

    manifest = write_manifest(tmp_path / "data", 0, 12)
    decoded = []
    real = client.app.site.decode_image
    monkeypatch.setattr(
        client.app.site, "decode_image", lambda p, s, m: decoded.append(p) or real(p, s, m)
    )
    first = _load(manifest, tmp_path / "state")
    assert len(decoded) == 12
    assert list((tmp_path / "state" / "image-cache").glob("images-*/*.pt"))
    decoded.clear()
    again = _load(manifest, tmp_path / "state")
    assert decoded == [] and torch.equal(again, first)  # nothing decoded twice
    changed = sorted((tmp_path / "data").rglob("*.png"))[0]
    stamp = changed.stat().st_mtime_ns + 10**9
    os.utime(changed, ns=(stamp, stamp))  # a file replaced in place: decoded again
    _load(manifest, tmp_path / "state")
    assert decoded == [changed.resolve()]
    for shard in (tmp_path / "state" / "image-cache").rglob("*.pt"):
        shard.write_bytes(b"damaged")
    decoded.clear()
    assert torch.equal(_load(manifest, tmp_path / "state"), first)  # read again, not trusted
    assert len(decoded) == 12


def test_a_hospital_with_its_own_data_needs_its_own_state_directory(tmp_path):
    """Else its ledger would live under the server's output-dir: a new one resets it."""
    from shared_model.config import ConfigError, HospitalConfig

    with pytest.raises(ConfigError, match=r"state-dir.*server's output-dir"):
        HospitalConfig.from_node_config({"data-manifest": "m.csv", "hospital-id": "h"})
