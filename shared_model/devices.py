"""Where torch runs: a device setting (cpu, cuda, cuda:N or auto), checked and resolved.

Every setting that chooses a device (a hospital's ``device``, ``--device`` of
``fedfusion predict`` and ``evaluate``, the benchmarks' ``--device``) goes through
:func:`resolve_device`. A GPU asked for where this torch sees none falls back to the CPU
with one logged warning naming the setting: the work still runs, slower. A spec that is
no device, or a GPU index that is not there, is a ConfigError naming the setting.
"""

from __future__ import annotations

import logging
import re

import torch

from shared_model.config import ConfigError
from shared_model.config.hospital import DEVICE_SPEC

__all__ = ["resolve_device"]

log = logging.getLogger("fedfusion.device")


def resolve_device(spec: str, setting: str) -> torch.device:
    """The torch device for ``spec``, given as ``setting`` (named in every message).

    ``auto`` is the first GPU if there is one, else the CPU; ``cuda`` or ``cuda:N`` where
    torch sees no GPU is the CPU, with a warning. ConfigError: ``spec`` is not cpu, cuda,
    cuda:N or auto, or names a GPU index this machine does not have.
    """
    if not re.fullmatch(DEVICE_SPEC, spec):
        raise ConfigError(f"{setting} = {spec!r}: expected cpu, cuda, cuda:N or auto")
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if spec != "auto":
            log.warning(
                "%s = %r: this torch (%s) sees no CUDA GPU, so it runs on the CPU; install a "
                "CUDA build of torch for the GPU, or set it to 'cpu' to silence this",
                setting,
                spec,
                torch.__version__,
            )
        return torch.device("cpu")
    if spec == "auto":
        return torch.device("cuda")
    index, count = int(spec.partition(":")[2] or 0), torch.cuda.device_count()
    if index >= count:
        raise ConfigError(
            f"{setting} = {spec!r}: this machine has {count} CUDA GPU(s), "
            f"cuda:0 to cuda:{count - 1}"
        )
    return torch.device(spec)
