"""Validation of a composed training config, before anything is built.

Hydra already refuses an unknown group choice (``norm=foo``) and lists the available options; this
module checks the *values*: a table of rules, one per key, each naming what is valid, plus the rules
that relate two groups (a ghost virtual batch larger than the batch, a detector on classification
data). Every broken rule is collected and reported at once by :class:`ConfigError`, e.g.::

    invalid config (2 problems):
      - model.depth=7: expected one of [18, 50]
      - norm.virtual_batch_size=64 is larger than data.batch_size=32: expected <= 32
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

from omegaconf import DictConfig, OmegaConf

from ..convert import KINDS
from ..models.lit_module import OPTIMIZERS, SCHEDULERS
from ..models.resnet import RESNET_DEPTHS, STEMS

__all__ = ["ConfigError", "validate_config", "NORM_OPTIONS", "WANDB_MODES"]

NORM_OPTIONS: dict[str, tuple[str, ...]] = {
    "batch": (),
    "sync": ("sync_group_size", "sync_timeout_s"),
    "ghost": ("virtual_batch_size",),
    "renorm": ("r_max", "d_max", "warmup_steps", "momentum", "sync_group_size", "sync_timeout_s"),
    "group": ("num_groups",),
    "frozen": (),
    "auto": ("per_device_batch", "min_local_batch", "min_global_batch", "world_size", "virtual_batch_size",
             "num_groups"),
}
"""Options each ``norm.kind`` accepts in the config (``NormConversion(kind, **options)``)."""

WANDB_MODES = (None, "online", "offline", "disabled")
_TASK_OF_DATA = {"DigitsDataModule": "classification", "ShapesDataModule": "detection"}
_TASK_OF_MODEL = {"ClassificationModule": "classification", "DetectionModule": "detection"}


class ConfigError(ValueError):
    """A composed config with invalid values; the message lists every problem."""


@dataclass(frozen=True)
class _Rule:
    key: str
    check: Callable[[Any], bool]
    expected: str
    required: bool = False


def _int_at_least(n: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= n


def _number_at_least(n: float, strict: bool = False) -> Callable[[Any], bool]:
    def check(v: Any) -> bool:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            return False
        return v > n if strict else v >= n
    return check


def _one_of(values: Any) -> Callable[[Any], bool]:
    return lambda v: v in values


_COMMON_RULES = (
    _Rule("data.batch_size", _int_at_least(1), "an int >= 1", required=True),
    _Rule("norm.kind", lambda v: isinstance(v, str) and v.lower() in KINDS, f"one of {list(KINDS)}", required=True),
    _Rule("norm.virtual_batch_size", _int_at_least(1), "an int >= 1"),
    _Rule("norm.num_groups", _int_at_least(1), "an int >= 1 (lowered to the largest divisor of C)"),
    _Rule("norm.r_max", _number_at_least(1.0), "a number >= 1"),
    _Rule("norm.d_max", _number_at_least(0.0), "a number >= 0"),
    _Rule("norm.warmup_steps", _int_at_least(0), "an int >= 0"),
    _Rule("norm.momentum", lambda v: v is None or (_number_at_least(0.0, True)(v) and v <= 1), "null or in (0, 1]"),
    _Rule("norm.min_local_batch", _int_at_least(1), "an int >= 1"),
    _Rule("norm.min_global_batch", _int_at_least(1), "an int >= 1"),
    _Rule("model.optimizer", _one_of(OPTIMIZERS), f"one of {list(OPTIMIZERS)}"),
    _Rule("model.scheduler", _one_of(SCHEDULERS), f"one of {list(SCHEDULERS)}"),
    _Rule("model.lr", _number_at_least(0.0, strict=True), "a number > 0"),
    _Rule("model.weight_decay", _number_at_least(0.0), "a number >= 0"),
    _Rule("trainer.use_distributed_sampler", _one_of((False,)),
          "false (the data modules shard with their own DistributedSampler)"),
    _Rule("trainer.sync_batchnorm", _one_of((False, None)), "false (the norm group converts the layers)"),
    _Rule("logger.wandb.mode", _one_of(WANDB_MODES), "null (offline unless WANDB_API_KEY is set), online, offline "
          "or disabled"),
)

_RESNET_RULES = (
    _Rule("depth", _one_of(tuple(RESNET_DEPTHS)), f"one of {sorted(RESNET_DEPTHS)}", required=True),
    _Rule("width", _int_at_least(1), "an int >= 1"),
    _Rule("stem", _one_of(STEMS), f"one of {list(STEMS)}"),
)

_YOLO_RULES = (
    _Rule("depth", _int_at_least(1), "an int >= 1 (residual units per CSP block)"),
    _Rule("width", _int_at_least(1), "an int >= 1"),
)


def _select(cfg: DictConfig, key: str) -> tuple[bool, Any]:
    """``(present, resolved value)`` of a dotted key."""
    missing = object()
    value = OmegaConf.select(cfg, key, default=missing, throw_on_missing=False)
    if value is missing:
        return False, None
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    return True, value


def _short(target: Optional[str]) -> str:
    return (target or "").rsplit(".", 1)[-1]


def _apply(cfg: DictConfig, rules: tuple[_Rule, ...], prefixes: tuple[str, ...], errors: list[str]) -> None:
    for rule in rules:
        for prefix in prefixes:  # the first prefix holding the key is the one users override
            key = f"{prefix}.{rule.key}" if prefix else rule.key
            present, value = _select(cfg, key)
            if present:
                if not rule.check(value):
                    errors.append(f"{key}={value!r}: expected {rule.expected}")
                break
        else:
            if rule.required:
                errors.append(f"{prefixes[0] + '.' if prefixes[0] else ''}{rule.key} is missing: expected "
                              f"{rule.expected}")


def validate_config(cfg: DictConfig) -> None:
    """Check a composed training config's values; raise :class:`ConfigError` listing every problem.

    Args:
        cfg: the composed config (``train.yaml`` plus overrides).

    Raises:
        ConfigError: an invalid value, an unknown norm option, or groups that do not fit together.
    """
    errors: list[str] = []
    for group in ("data", "model", "norm", "trainer"):
        if cfg.get(group) is None:
            errors.append(f"group {group!r} is missing: choose one, e.g. {group}=<option>")
    if errors:
        raise ConfigError(_message(errors))
    _apply(cfg, _COMMON_RULES, ("",), errors)
    _check_norm(cfg, errors)
    _check_model(cfg, errors)
    _check_finetune(cfg, errors)
    if errors:
        raise ConfigError(_message(errors))


def _check_norm(cfg: DictConfig, errors: list[str]) -> None:
    kind = str(cfg.norm.get("kind", "")).lower()
    if kind not in NORM_OPTIONS:
        return
    given = [k for k in cfg.norm if not str(k).startswith("_") and k != "kind"]
    unknown = sorted(set(given) - set(NORM_OPTIONS[kind]))
    if unknown:
        errors.append(f"norm.kind={kind!r} does not take {unknown}: its options are {list(NORM_OPTIONS[kind])}")
    k = cfg.norm.get("sync_group_size")
    if k is not None and (not isinstance(k, int) or k < 1):
        errors.append(f"norm.sync_group_size={k!r}: expected null or an int >= 1 dividing the world size")
    t = cfg.norm.get("sync_timeout_s")
    if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or t <= 0):
        errors.append(f"norm.sync_timeout_s={t!r}: expected null (the layers' default) or seconds > 0")
    vbs, batch = cfg.norm.get("virtual_batch_size"), cfg.data.get("batch_size")
    if kind == "ghost" and vbs is None:
        errors.append("norm.virtual_batch_size is missing: ghost needs an int >= 1")
    if kind == "ghost" and isinstance(vbs, int) and isinstance(batch, int) and vbs > batch:
        errors.append(f"norm.virtual_batch_size={vbs} is larger than data.batch_size={batch}: expected <= {batch} "
                      "(a virtual batch is a slice of the per-device batch)")


def _check_model(cfg: DictConfig, errors: list[str]) -> None:
    model_target = _short(cfg.model.get("_target_"))
    net = cfg.model.get("net")
    net_target = _short(net.get("_target_")) if isinstance(net, DictConfig) else ""
    if net_target == "build_resnet":
        _apply(cfg, _RESNET_RULES, ("model", "model.net"), errors)
    elif net_target == "YOLO":
        _apply(cfg, _YOLO_RULES, ("model", "model.net"), errors)
        size = cfg.data.get("image_size")
        if isinstance(size, int) and size % 16:
            errors.append(f"data.image_size={size}: the YOLO detector needs a multiple of 16")
    model_task = _TASK_OF_MODEL.get(model_target)
    data_task = _TASK_OF_DATA.get(_short(cfg.data.get("_target_")))
    if model_task and data_task and model_task != data_task:
        fits = sorted(d.replace("DataModule", "").lower() for d, t in _TASK_OF_DATA.items() if t == model_task)
        errors.append(f"model {model_target} is a {model_task} model but data {_short(cfg.data._target_)} is "
                      f"{data_task} data: use data={fits[0]} (or a {model_task} model)")


def _check_finetune(cfg: DictConfig, errors: list[str]) -> None:
    checkpoint = OmegaConf.select(cfg, "finetune.checkpoint", default=None)
    resume = cfg.get("ckpt_path")
    for key, path in (("finetune.checkpoint", checkpoint), ("ckpt_path", resume)):
        if key == "ckpt_path" and path == "last":  # this run's last.ckpt if there is one (restarts)
            continue
        if path is not None and not os.path.isfile(str(path)):
            errors.append(f"{key}={path!r}: no such file (expected a Lightning .ckpt, e.g. "
                          "<run dir>/checkpoints/last.ckpt)")
    callbacks = cfg.get("callbacks") or {}
    freezes = any(_short((c or {}).get("_target_")) == "FreezeNormStats" for c in callbacks.values())
    if freezes and checkpoint is None and resume is None:
        errors.append("callbacks.freeze_norm_stats freezes the statistics of an untrained model: pass the "
                      "trained run's checkpoint with ckpt_path=<path>/last.ckpt (or finetune.checkpoint=...)")


def _message(errors: list[str]) -> str:
    head = f"invalid config ({len(errors)} problem{'s' if len(errors) > 1 else ''}):"
    return "\n".join([head] + [f"  - {e}" for e in errors])
