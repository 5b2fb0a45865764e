"""Where a hospital trains: device resolution fails at start, with the key named."""

import pytest
import torch

from client.app.site import resolve_device
from shared_model.config import ConfigError


def test_cpu_and_auto_resolve_on_this_machine():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_a_gpu_is_refused_with_the_key_named(spec):
    with pytest.raises(ConfigError, match=rf"hospital.device = '{spec}'.*set device = 'cpu'"):
        resolve_device(spec)


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
