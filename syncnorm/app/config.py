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

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from omegaconf import DictConfig, OmegaConf

from syncnorm import rules
from syncnorm.convert import AUTO, conversion_kind, conversion_kinds
from .models.lit_module import OPTIMIZERS, SCHEDULERS
from .models.resnet import RESNET_DEPTHS, STEMS

__all__ = ["ConfigError", "config_dir", "import_modules", "norm_options", "validate_config", "WANDB_MODES"]

WANDB_MODES = (None, "online", "offline", "disabled")
_TASK_OF_DATA = {"DigitsDataModule": "classification", "ShapesDataModule": "detection"}
_TASK_OF_MODEL = {"ClassificationModule": "classification", "DetectionModule": "detection"}


class ConfigError(ValueError):
    """A composed config with invalid values; the message lists every problem."""


def config_dir() -> Path:
    """The folder of the app's Hydra configs (``train.yaml`` and the groups). There is one copy, the
    repository's top-level ``conf/``; a wheel installs it as ``syncnorm/app/conf/`` (``setup.py``).
    So: ``syncnorm/app/conf/`` when it exists (an installed package), else the checkout's ``conf/``
    (an editable install, or ``PYTHONPATH=<checkout>``). A user folder given with Hydra's
    ``--config-dir`` is searched first and can add group options (a model, a norm).

    Raises:
        FileNotFoundError: neither folder holds ``train.yaml`` (a broken install).
    """
    here = Path(__file__).resolve().parent
    candidates = (here / "conf", here.parents[1] / "conf")
    for folder in candidates:
        if (folder / "train.yaml").is_file():
            return folder
    raise FileNotFoundError(f"syncnorm's app configs are missing: expected train.yaml in {candidates[0]} "
                            f"(installed) or {candidates[1]} (checkout); reinstall syncnorm")


def import_modules(names: Optional[Iterable[str]]) -> None:
    """Import the config's ``imports`` (module names), before the config is checked: a module that
    calls :func:`syncnorm.register_norm` makes its kind a valid ``norm.kind`` (in every process of the
    run, since each one runs this).

    Raises:
        ConfigError: a module that cannot be imported.
    """
    for name in names or ():
        try:
            importlib.import_module(str(name))
        except ImportError as err:
            raise ConfigError(_message([f"imports: cannot import {name!r}: {err}"])) from err


@dataclass(frozen=True)
class _Key:
    """A config key and the rule of its value."""

    key: str
    rule: rules.Rule
    required: bool = False


def _keys(prefix: str, *items: tuple[rules.Rule, bool]) -> tuple[_Key, ...]:
    return tuple(_Key(f"{prefix}{rule.name}" if prefix else rule.name, rule, required) for rule, required in items)


_COMMON_RULES = (
    *_keys("data.", (rules.int_at_least("batch_size", 1), True)),
    *_keys("model.", (rules.one_of("optimizer", OPTIMIZERS), False), (rules.one_of("scheduler", SCHEDULERS), False),
           (rules.number_above("lr", 0.0), False), (rules.number_at_least("weight_decay", 0.0), False)),
    *_keys("trainer.", (rules.Rule("use_distributed_sampler", "false (the data modules shard with their own "
                                   "DistributedSampler)", lambda v: v is False), False),
           (rules.Rule("sync_batchnorm", "false (the norm group converts the layers)", lambda v: v in (False, None)),
            False)),
    *_keys("logger.wandb.", (rules.Rule("mode", "null (offline unless WANDB_API_KEY is set), online, offline or "
                                        "disabled", lambda v: v in WANDB_MODES), False)),
)

_RESNET_RULES = _keys("", (rules.one_of("depth", tuple(sorted(RESNET_DEPTHS))), True),
                      (rules.int_at_least("width", 1), False), (rules.one_of("stem", STEMS), False))

_YOLO_RULES = _keys("", (rules.int_at_least("depth", 1, " (residual units per CSP block)"), False),
                    (rules.int_at_least("width", 1), False))


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


def _apply(cfg: DictConfig, keys: tuple[_Key, ...], prefixes: tuple[str, ...], errors: list[str]) -> None:
    for item in keys:
        for prefix in prefixes:  # the first prefix holding the key is the one users override
            key = f"{prefix}.{item.key}" if prefix else item.key
            present, value = _select(cfg, key)
            if present:
                if not item.rule.accepts(value):
                    errors.append(f"{key}={value!r}: expected {item.rule.expected}")
                break
        else:
            if item.required:
                errors.append(f"{prefixes[0] + '.' if prefixes[0] else ''}{item.key} is missing: expected "
                              f"{item.rule.expected}")


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


def norm_options(kind: str) -> dict[str, rules.Rule]:
    """The options ``norm.<option>`` a config may set for ``norm.kind=kind`` (a known conversion kind):
    ``NormConversion``'s, i.e. the kind's options in the table of :mod:`syncnorm.factory` without
    ``process_group`` (an object), plus ``sync_group_size`` and ``sync_timeout_s`` for a kind that
    synchronizes."""
    row = conversion_kind(kind, "norm.kind")
    options = {k: r for k, r in row.options.items() if k != "process_group"}
    if row.synchronizes:
        options["sync_group_size"] = rules.SYNC_GROUP_SIZE
        options["sync_timeout_s"] = rules.SYNC_TIMEOUT_S
    return options


def _check_norm(cfg: DictConfig, errors: list[str]) -> None:
    kind = cfg.norm.get("kind")
    if not isinstance(kind, str) or kind.lower() not in conversion_kinds():
        errors.append(f"norm.kind={kind!r}: expected one of {conversion_kinds()}")
        return
    kind = kind.lower()
    allowed = norm_options(kind)
    given = {str(k): v for k, v in _node(cfg.norm).items() if not str(k).startswith("_") and k != "kind"}
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        errors.append(f"norm.kind={kind!r} does not take {unknown}: its options are {list(allowed)}")
    for key, value in given.items():
        if key in allowed and not allowed[key].accepts(value):
            errors.append(f"norm.{key}={value!r}: expected {allowed[key].expected}")
    required = () if kind == AUTO else conversion_kind(kind, "norm.kind").required
    for key in required:
        if given.get(key) is None:
            errors.append(f"norm.{key} is missing: {kind} needs {allowed[key].expected}")
    vbs, batch = given.get("virtual_batch_size"), cfg.data.get("batch_size")
    if kind == "ghost" and isinstance(vbs, int) and isinstance(batch, int) and vbs > batch:
        errors.append(f"norm.virtual_batch_size={vbs} is larger than data.batch_size={batch}: expected <= {batch} "
                      "(a virtual batch is a slice of the per-device batch)")


def _node(node: DictConfig) -> dict[str, Any]:
    """A config node as a plain resolved dict."""
    return OmegaConf.to_container(node, resolve=True)


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
