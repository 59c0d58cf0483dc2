"""Helpers of the Hydra training app (:mod:`syncnorm.train`): config resolvers and validation,
object construction from configs, distributed teardown. Importing this package needs hydra-core and
pytorch-lightning (the ``hydra`` and ``lightning`` extras)."""

from .config import ConfigError, validate_config
from .resolvers import register_resolvers
from .runtime import (
    init_distributed_after_restart,
    instantiate_callbacks,
    instantiate_loggers,
    load_weights,
    report_outputs,
    shutdown_distributed,
)

__all__ = [
    "ConfigError",
    "init_distributed_after_restart",
    "instantiate_callbacks",
    "instantiate_loggers",
    "load_weights",
    "register_resolvers",
    "report_outputs",
    "shutdown_distributed",
    "validate_config",
]
