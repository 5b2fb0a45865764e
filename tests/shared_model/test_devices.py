"""Device settings: a GPU that is not there falls back to the CPU, warned; a bad one is named."""

import logging

import pytest
import torch

from shared_model.config import ConfigError
from shared_model.devices import resolve_device

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")


def test_cpu_and_auto_resolve_on_this_machine(caplog):
    assert resolve_device("cpu", "hospital.device") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto", "hospital.device").type == expected
    assert not caplog.records  # auto asks for no GPU in particular: nothing to warn about


@no_gpu
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_a_gpu_where_there_is_none_falls_back_to_the_cpu_with_the_setting_named(spec, caplog):
    with caplog.at_level(logging.WARNING, logger="fedfusion.device"):
        assert resolve_device(spec, "hospital.device") == torch.device("cpu")
    (record,) = caplog.records
    message = record.getMessage()
    assert record.levelno == logging.WARNING and "\n" not in message
    assert message.startswith(f"hospital.device = '{spec}': ") and "sees no CUDA GPU" in message


@pytest.mark.parametrize("spec", ["gpu", "CUDA", "cuda:", "cuda:x", "cuda:-1", "", "cpu "])
def test_a_spec_that_is_no_device_is_refused_naming_the_setting(spec):
    with pytest.raises(ConfigError, match=rf"^--device = '{spec}': expected cpu, cuda"):
        resolve_device(spec, "--device")


def test_a_gpu_index_this_machine_lacks_is_refused_and_one_it_has_is_kept(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"--device = 'cuda:7': this machine has 2 CUDA GPU"):
        resolve_device("cuda:7", "--device")
    with pytest.raises(ConfigError, match=r"cuda:0 to cuda:1"):
        resolve_device("cuda:2", "--device")
    assert resolve_device("cuda:1", "--device") == torch.device("cuda:1")
    assert resolve_device("cuda", "--device") == torch.device("cuda")
    assert resolve_device("auto", "--device") == torch.device("cuda")
