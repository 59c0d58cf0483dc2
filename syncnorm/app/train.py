"""The app's entry point: ``python -m syncnorm.train [overrides]`` (or ``syncnorm-train``).

``train(cfg)`` builds every object from the config's ``_target_`` entries (data module, LightningModule,
the norm group's :class:`~syncnorm.callbacks.NormConversion`, callbacks, loggers, Trainer), fits,
and returns the final metrics; :func:`main` adds Hydra's command line (``@hydra.main``) and short
messages for input errors. Configs live in the repository's top-level ``conf/`` folder, installed
with the wheel as ``syncnorm/app/conf/`` (``train.yaml`` is the root;
:func:`~syncnorm.app.config.config_dir`); ``--config-dir <folder>`` adds a user's own group options.
See ``docs/app.md`` (running, multirun, resume, outputs, errors) and ``launch/README.md``
(single-node, multi-node and SLURM launches).

Examples::

    python -m syncnorm.train                                     # README main job: 2 CPU processes
    torchrun --standalone --nproc_per_node=2 -m syncnorm.train   # the same, launched by torchrun
    python -m syncnorm.train trainer=cpu norm=batch data.batch_size=64
    python -m syncnorm.train model=resnet50 norm=group norm.num_groups=8
    python -m syncnorm.train experiment=finetune_frozen ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import hydra
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig

from syncnorm import distributed

from .config import ConfigError, config_dir, import_modules, validate_config
from .loggers import KeepLogHistory
from .resolvers import register_resolvers
from .runtime import (ddp_children_run_this_job, exit_now, exit_with_user_error, finish_wandb,
                      init_distributed_for_worker_group, instantiate_callbacks, instantiate_loggers, load_weights,
                      report_outputs, resolved_container, short_errors, task_started, to_float_dict)

__all__ = ["CONF_DIR", "train", "main"]

CONF_DIR = config_dir()
"""The app's config folder (:func:`syncnorm.app.config.config_dir`)."""

log = logging.getLogger(__name__)

register_resolvers()  # ${syncnorm.devices:..}, ${syncnorm.num_nodes:..}, ${syncnorm.run_id:} used by conf/


def _net_from_data(net_cfg: DictConfig, datamodule: pl.LightningDataModule) -> dict[str, Any]:
    """``num_classes``/``in_channels`` left ``null`` in the model config, taken from the data module."""
    fill = {}
    for key, attr in (("num_classes", "num_classes"), ("in_channels", "in_channels")):
        if key in net_cfg and net_cfg[key] is None:
            fill[key] = int(getattr(datamodule, attr))
    return fill


def train(cfg: DictConfig) -> dict[str, float]:
    """Validate ``cfg``, build the run from it, fit, and return the final metrics.

    Args:
        cfg: the composed config (``conf/train.yaml`` plus overrides).

    Returns:
        ``trainer.callback_metrics`` as floats (``train/loss``, ``val/acc``, ``norm/...``, ...).

    Raises:
        ConfigError: invalid values (raised before anything is built).
    """
    import_modules(cfg.get("imports"))  # e.g. a module registering a norm kind, before the check
    validate_config(cfg)
    if cfg.get("seed") is not None:
        pl.seed_everything(int(cfg.seed), workers=True)  # the same initial weights on every rank

    datamodule: pl.LightningDataModule = instantiate(cfg.data)
    model: pl.LightningModule = instantiate(cfg.model, net=_net_from_data(cfg.model.net, datamodule))
    finetune = cfg.get("finetune") or {}
    if finetune.get("checkpoint"):
        load_weights(model, finetune.checkpoint, strict=bool(finetune.get("strict", True)))
    # the norm conversion runs first in setup, so the other callbacks see the converted layers
    show_bar = cfg.trainer.get("enable_progress_bar", True) is not False
    callbacks = [instantiate(cfg.norm)] + instantiate_callbacks(cfg.get("callbacks"), progress_bar=show_bar)
    callbacks.append(KeepLogHistory())  # a resumed run keeps the CSV rows before its checkpoint
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for logger in trainer.loggers:
        logger.log_hyperparams({"config": resolved_container(cfg)})

    resume = cfg.get("ckpt_path")
    if resume and resume == finetune.get("checkpoint"):
        resume = None  # fine-tuning: weights only, fresh optimizer and counters
    init_distributed_for_worker_group(trainer)
    success = False
    try:
        with ddp_children_run_this_job():  # a multirun job: Lightning's DDP children run this job only
            trainer.fit(model, datamodule=datamodule, ckpt_path=resume)
        metrics = to_float_dict(trainer.callback_metrics)
        report_outputs(trainer, metrics, run_dir=str(cfg.paths.output_dir))
        success = True
    finally:
        finish_wandb(success)
        distributed.shutdown(success)
    return metrics


def _task(cfg: DictConfig) -> Optional[float]:
    """The Hydra task: train, return ``cfg.optimized_metric`` for sweepers.

    A failed distributed run whose process group could not be closed (a peer became unreachable,
    see :func:`syncnorm.distributed.shutdown`) ends the process at once, with the traceback and exit
    code 1, instead of waiting for gloo's own timeout at interpreter exit (torchrun can restart it).
    """
    task_started()  # the config is composed: Hydra reports the task's own failures as usual
    try:
        metrics = train(cfg)
    except ConfigError as err:  # raised before anything distributed started
        exit_with_user_error(err)  # one message (rank 0), exit code 2 (in a multirun: ends the sweep)
    except Exception:
        if distributed.is_distributed():
            exit_now(1)
        raise
    key = cfg.get("optimized_metric")
    return metrics.get(key) if key else None


_hydra_main = hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")(_task)


def main() -> Optional[float]:
    """Console entry point (``syncnorm-train``, ``python -m syncnorm.train``): Hydra's command line
    (overrides, ``-m``, ``--config-dir``...) around :func:`train`. Errors in the user's input (a
    config value, an unknown key or option, a checkpoint that does not fit) print one message (rank 0)
    and exit with code 2 (:func:`~syncnorm.app.runtime.short_errors`)."""
    with short_errors():
        return _hydra_main()


if __name__ == "__main__":
    main()
