"""Every setting of fedfusion, parsed in one place.

Flower hands the apps flat, kebab-case mappings: ``context.run_config`` (the run, the
same at every site) and ``context.node_config`` (the facts of one site). This package is
the only one that knows those keys; everything else receives the frozen dataclasses.

- ``schema``: the engine (declare, parse, coerce, check, explain);
- ``model``: the shared model's settings; ``run``: the run's (training, privacy
  requests, secure aggregation, data, the coordinator);
- ``hospital``: a hospital's facts and privacy policy; ``presets``: named model settings.

The deployment files' own tables live with the commands that read them
(``client/node/config.py``, ``server/commands/config.py``).
"""

from shared_model.config.hospital import SIM_DEVICE_ENV, SIM_FEATURE_CACHE_ENV, HospitalConfig
from shared_model.config.model import (
    BRANCHES,
    ENCODER_MODES,
    FUSION_MODES,
    IMAGE_ENCODERS,
    TEXT_ENCODERS,
    ModelConfig,
)
from shared_model.config.presets import PRESETS, SIMULATE_DEFAULTS
from shared_model.config.run import (
    ACCOUNTANTS,
    AGGREGATORS,
    GRAD_SAMPLE_MODES,
    LR_SCHEDULES,
    OPTIMIZERS,
    STRATEGIES,
    DataConfig,
    PrivacyConfig,
    RunConfig,
    SecAggConfig,
    ServerConfig,
    TrainConfig,
    describe_run_config,
)
from shared_model.config.schema import ConfigError, flatten_toml, parse_overrides

__all__ = [
    "ACCOUNTANTS",
    "AGGREGATORS",
    "BRANCHES",
    "ENCODER_MODES",
    "FUSION_MODES",
    "GRAD_SAMPLE_MODES",
    "IMAGE_ENCODERS",
    "LR_SCHEDULES",
    "OPTIMIZERS",
    "PRESETS",
    "SIMULATE_DEFAULTS",
    "SIM_DEVICE_ENV",
    "SIM_FEATURE_CACHE_ENV",
    "STRATEGIES",
    "TEXT_ENCODERS",
    "ConfigError",
    "DataConfig",
    "HospitalConfig",
    "ModelConfig",
    "PrivacyConfig",
    "RunConfig",
    "SecAggConfig",
    "ServerConfig",
    "TrainConfig",
    "describe_run_config",
    "flatten_toml",
    "parse_overrides",
]
