"""YAML (or a dict) becomes a validated, frozen Config before any model or data is loaded.

Every error is a BadInput naming the file and the key path (``attacks[0].epsilons[1]``) and,
where there is a closed set, the choices that would have been valid.

The layer translates what a config says into the plain values the layers below take: budgets
("8/255" -> float: base.parse_epsilon, base.plain_knobs), training settings
(train.TrainConfig.settings() -> harness.training.TrainSettings), and the metric ids a suite will
produce (metric_ids), checked against the registries of attacks, defenses and probes without
importing any evaluation module.

- base.py: Epsilon, parse_epsilon, the strict model base
- schema.py: Config and its sections, parse_config, load_config
- train.py: `train:` (TrainConfig), train_plan, builtin_recipe, defense_knobs
- metric_ids.py: suite_metric_ids and the ids of probes, defended variants and detectors
"""

from harness.config.base import Epsilon, EpsilonField, Strict, parse_epsilon, plain_knobs
from harness.config.schema import (BACKENDS, CORRUPTION_KINDS, DEFAULT_CONFIG_PATH, AttackConfig, AttackEntry, CertificateConfig, Config, CorruptionConfig,
                                   DataConfig, DefenseConfig, EngineConfig, GateConfig, ModelConfig, Preprocessing, ProbeConfig, load_config,
                                   parse_config)
from harness.config.train import (OptimizerConfig, ScheduleConfig, TrainConfig, TrainDataConfig, builtin_recipe, defense_knobs,
                                  train_plan)

__all__ = ["Epsilon", "EpsilonField", "Strict", "parse_epsilon", "plain_knobs", "Config", "ModelConfig", "DataConfig", "EngineConfig", "Preprocessing",
           "AttackConfig", "AttackEntry", "CorruptionConfig", "DefenseConfig", "ProbeConfig", "CertificateConfig", "GateConfig", "TrainConfig",
           "TrainDataConfig", "OptimizerConfig", "ScheduleConfig", "train_plan", "builtin_recipe", "defense_knobs", "load_config",
           "parse_config", "DEFAULT_CONFIG_PATH", "BACKENDS", "CORRUPTION_KINDS"]
