"""Where a hospital trains: device resolution fails at start, with the key named."""

import pytest
import torch

from client.site import resolve_device
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
