"""The federation's configuration: one typed, validated, frozen object resolved from a scenario TOML and flags.

``schema`` holds the dataclasses (one per TOML table) and the allowed values, ``load`` turns a scenario into
a :class:`FederationConfig` and back into TOML, ``validation`` holds the rules beyond types. The names below
are re-exported because about forty modules, tests and benchmarks read the config; the package imports only
those three light modules (no numpy, no data), so importing it stays cheap and creates no import circle.
"""

from fedllm.config.load import (
    SCENARIO_DIR,
    config_hash,
    from_dict,
    load_config,
    read_toml,
    scenario_path,
    to_dict,
    to_toml,
)
from fedllm.config.schema import (
    ACCOUNTANTS,
    DEFAULT_SCENARIO,
    MODES,
    ClientConfig,
    ClientSettings,
    DataConfig,
    EmpiricalAuditConfig,
    FederationConfig,
    ModelConfig,
    PrivacyConfig,
    SecureAggregationConfig,
    SimulationConfig,
    TrainingConfig,
)
from fedllm.config.validation import validate

__all__ = [
    "ACCOUNTANTS",
    "DEFAULT_SCENARIO",
    "MODES",
    "SCENARIO_DIR",
    "ClientConfig",
    "ClientSettings",
    "DataConfig",
    "EmpiricalAuditConfig",
    "FederationConfig",
    "ModelConfig",
    "PrivacyConfig",
    "SecureAggregationConfig",
    "SimulationConfig",
    "TrainingConfig",
    "config_hash",
    "from_dict",
    "load_config",
    "read_toml",
    "scenario_path",
    "to_dict",
    "to_toml",
    "validate",
]
