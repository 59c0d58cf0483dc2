"""Building the run's objects from config nodes, loading weights, reporting, the torchrun-restart setup."""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import sys
import traceback
from typing import Any, Iterator, NoReturn, Optional

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from torch import nn

from syncnorm import distributed

__all__ = ["ddp_strategy", "init_distributed_for_worker_group", "instantiate_callbacks", "instantiate_loggers", "load_weights",
           "report_outputs", "resolved_container", "to_float_dict", "exit_now", "ddp_children_run_this_job",
           "short_errors", "task_started", "exit_with_user_error", "finish_wandb"]

log = logging.getLogger(__name__)


def _targets(group: Optional[DictConfig]) -> list[tuple[str, DictConfig]]:
    """``(name, node)`` of every entry of a ``callbacks``/``logger`` group that has a ``_target_``."""
    if not group:
        return []
    if not isinstance(group, DictConfig):
        raise TypeError(f"expected a mapping of name -> config with _target_, got {type(group).__name__}")
    return [(str(k), v) for k, v in group.items() if isinstance(v, DictConfig) and "_target_" in v]


def instantiate_callbacks(group: Optional[DictConfig], progress_bar: bool = True) -> list[pl.Callback]:
    """One callback per entry of the ``callbacks`` group, in the group's order.

    Args:
        group: the ``callbacks`` node (name -> config with ``_target_``).
        progress_bar: keep progress-bar callbacks; ``False`` (``trainer.enable_progress_bar=false``)
            drops them, since Lightning refuses a progress bar callback when the bar is disabled.
    """
    callbacks = [instantiate(node) for _, node in _targets(group)]
    if not progress_bar:
        from pytorch_lightning.callbacks import ProgressBar

        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    return callbacks


def wandb_mode(node: DictConfig) -> str:
    """The W&B mode for a logger node: ``node.mode`` when set, else ``online`` if ``WANDB_API_KEY`` is
    set (a key is configured), else ``offline``."""
    mode = node.get("mode")
    if mode is None:
        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return str(mode)


def instantiate_loggers(group: Optional[DictConfig]) -> list[Any]:
    """One logger per entry of the ``logger`` group; a W&B logger gets its resolved mode and the run
    folder's W&B id (:func:`~syncnorm.app.loggers.wandb_resume_options`) unless ``id`` is set."""
    from .loggers import wandb_resume_options

    loggers = []
    for _, node in _targets(group):
        if node._target_.endswith("WandbLogger"):
            mode = wandb_mode(node)
            node = node.copy()
            with open_dict(node):
                node.mode = mode
                node.offline = mode == "offline"
                if node.get("id") is None and node.get("save_dir"):  # a restart continues the same W&B run
                    node.update(wandb_resume_options(str(node.save_dir)))
        loggers.append(instantiate(node))
    return loggers


def load_weights(module: nn.Module, path: str, strict: bool = True) -> None:
    """Load only the model weights (``state_dict``) of a Lightning checkpoint into ``module``.

    Optimizer state, epoch and step counters are not restored (that is what ``ckpt_path`` resume
    does). The keys do not depend on the norm kind, so a checkpoint of a ``norm=sync`` run loads
    into a ``norm=batch`` model and back.

    Raises:
        ConfigError: the file holds no ``state_dict``; or its weights do not fit ``module`` (keys
            missing or unexpected with ``strict``, or shapes that differ): the message names the
            model settings (hyper-parameters) and the norm kind the checkpoint was written with, and
            those of ``module`` that differ.
    """
    from .config import ConfigError

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if state is None:
        raise ConfigError(f"load_weights: {path} is not a Lightning checkpoint (no 'state_dict'); "
                          f"found keys {sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__}")
    try:
        result = module.load_state_dict(state, strict=strict)
    except RuntimeError as err:
        raise ConfigError(_mismatch_message(module, path, ckpt, state, str(err))) from None
    if not strict and (result.missing_keys or result.unexpected_keys):
        log.warning("load_weights(%s): missing %s, unexpected %s", path, result.missing_keys, result.unexpected_keys)


def _mismatch_message(module: nn.Module, path: str, ckpt: dict, state: dict, torch_error: str) -> str:
    """What a checkpoint was written with, against ``module``: for a state_dict that does not load."""
    saved = {str(k): v for k, v in (ckpt.get("hyper_parameters") or {}).items()}
    ours = {str(k): v for k, v in dict(getattr(module, "hparams", {}) or {}).items()}
    norm = next((v.get("kind") for k, v in (ckpt.get("callbacks") or {}).items()
                 if str(k).startswith("NormConversion") and isinstance(v, dict) and v.get("kind")), None)
    here = module.state_dict()
    missing = sorted(set(here) - set(state))
    unexpected = sorted(set(state) - set(here))
    shapes = sorted(k for k in set(here) & set(state) if tuple(here[k].shape) != tuple(state[k].shape))
    differ = [f"model.{k}={saved[k]!r} (this run: {ours[k]!r})" for k in sorted(set(saved) & set(ours))
              if saved[k] != ours[k]]
    written = ", ".join(f"{k}={v!r}" for k, v in saved.items() if k in ("depth", "width", "stem")) or "?"
    lines = [f"finetune.checkpoint={path} does not fit this model: it was written by a model with {written}"
             f"{f' and norm={norm}' if norm else ''}.",
             f"  differing settings: {', '.join(differ) if differ else 'none in the hyper-parameters'}",
             f"  weights: {len(missing)} missing, {len(unexpected)} unexpected, {len(shapes)} of another shape"
             + (f" (e.g. {shapes[0]}: {tuple(state[shapes[0]].shape)} in the checkpoint, "
                f"{tuple(here[shapes[0]].shape)} here)" if shapes else ""),
             "  Use the model settings of the run that wrote it (or finetune.strict=false to load the keys that "
             "fit, when only keys differ)."]
    if not saved and not norm:  # not an app checkpoint: torch's own first line says what failed
        lines.insert(1, "  " + torch_error.splitlines()[0])
    return "\n".join(lines)


def finish_wandb(success: bool) -> None:
    """End the W&B run this process started, if any (``exit_code`` 0 or 1): a failed attempt is marked
    failed, and a later attempt in the same process (a resume) starts its own run with the same id
    instead of reusing this one. Data is flushed when the process exits (wandb's own exit hook)."""
    wandb = sys.modules.get("wandb")
    run = getattr(wandb, "run", None) if wandb is not None else None
    if run is not None:
        run.finish(exit_code=0 if success else 1)


def report_outputs(trainer: pl.Trainer, metrics: dict[str, float], run_dir: Optional[str] = None) -> None:
    """Log (rank 0 only; the console and the run's log file) where everything went: the run folder,
    Hydra's saved config (``.hydra/``), the log file, the checkpoint, the loggers, the final metrics."""
    if not trainer.is_global_zero:
        return
    lines = ["", "syncnorm.train finished:"]
    if run_dir:
        lines.append(f"  run folder: {run_dir}")
    config = _hydra_config_folder()
    if config:
        lines.append(f"  config: {config}")
    files = [h.baseFilename for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    if files:
        lines.append(f"  log: {files[0]}")
    ckpt = trainer.checkpoint_callback
    if ckpt is not None:
        last = getattr(ckpt, "last_model_path", "") or getattr(ckpt, "best_model_path", "")
        lines.append(f"  checkpoint: {last or '(none saved)'}")
    for logger in trainer.loggers:
        lines.append(f"  {type(logger).__name__}: {_logger_location(logger)}")
    shown = {k: v for k, v in sorted(metrics.items()) if k.startswith(("val/", "train/"))}
    if shown:
        lines.append("  metrics: " + ", ".join(f"{k}={v:.4f}" for k, v in shown.items()))
    log.info("\n".join(lines))


def _hydra_config_folder() -> Optional[str]:
    """``<run dir>/.hydra`` (Hydra's saved config and overrides) when Hydra wrote one, else ``None``."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    out = OmegaConf.select(hydra_cfg, "runtime.output_dir", default=None, throw_on_missing=False)
    if not hydra_cfg.output_subdir or not out:  # no saved config (Lightning's DDP children), or compose API
        return None
    folder = os.path.join(out, hydra_cfg.output_subdir)
    return folder if os.path.isdir(folder) else None


def _logger_location(logger: Any) -> str:
    if type(logger).__name__ == "WandbLogger":
        run = getattr(logger, "_experiment", None)
        folder = getattr(run, "dir", None) if run is not None else None
        mode = getattr(getattr(run, "settings", None), "mode", None)
        return f"{os.path.dirname(folder) if folder else logger.save_dir} (mode {mode})"
    return str(getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None))


def to_float_dict(metrics: dict[str, Any]) -> dict[str, float]:
    """``trainer.callback_metrics`` as plain floats."""
    out = {}
    for k, v in metrics.items():
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            continue
    return out


def ddp_strategy(sync_group_size: Optional[int] = None, sync_buffers: Optional[bool] = None,
                 **kwargs: Any) -> pl.strategies.DDPStrategy:
    """The app's DDP strategy (``conf/trainer/ddp_cpu.yaml``, ``ddp_gpu.yaml``, ``multinode.yaml``).

    DDP copies rank 0's buffers to every rank at each forward unless told not to. ``sync_buffers``
    decides it; ``None`` (the DDP trainers) keeps DDP's default except with ``norm.sync_group_size``
    set (``sync_group_size``), where each group keeps its own running statistics and the copy would
    overwrite them (:class:`syncnorm.callbacks.NormConversion` refuses that combination). The setting
    goes to DDP under :data:`DDP_BUFFER_SYNC_ARG`. ``kwargs`` (e.g. ``timeout``) go to
    ``DDPStrategy``."""
    if sync_buffers is None:
        sync_buffers = sync_group_size is None
    if not sync_buffers:
        kwargs[DDP_BUFFER_SYNC_ARG] = False
    return pl.strategies.DDPStrategy(**kwargs)


DDP_BUFFER_SYNC_ARG = ("forward_sync_buffers" if "forward_sync_buffers" in
                       inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters else "broadcast_buffers")
"""DistributedDataParallel's argument for the per-forward copy of rank 0's buffers: ``forward_sync_buffers``
from torch 2.13 on (where ``broadcast_buffers`` warns that it is deprecated), ``broadcast_buffers`` before."""


def init_distributed_for_worker_group(trainer: pl.Trainer) -> bool:
    """Initialize the process group ourselves under torchrun, on store keys of this worker group only.

    torchrun's agents share one store with their workers for the whole job, and torch (2.13) does not
    prefix the keys per worker group: after ``--max-restarts`` restarts a group, the new workers'
    gloo full-mesh connect read the previous group's addresses (connection refused). Here the group is
    created under ``/syncnorm/<generation>`` (:func:`syncnorm.distributed.worker_generation`: the
    rendezvous round where the launcher gives its endpoint, else the restart count), with the backend
    and timeout ``trainer``'s strategy would use (its ``process_group_backend``, else NCCL on a CUDA
    root device and gloo otherwise; its ``timeout``); Lightning then finds the group initialized and
    uses it. Does nothing outside torchrun, or on torchrun's first attempt without the endpoint.
    Returns whether it initialized the group.
    """
    if distributed.is_distributed():
        return False
    generation = distributed.worker_generation()
    if generation is None:
        return False
    strategy = trainer.strategy
    backend = (getattr(strategy, "process_group_backend", None)
               or ("nccl" if strategy.root_device.type == "cuda" else "gloo"))
    timeout = getattr(strategy, "_timeout", None)  # DDPStrategy(timeout=...), Lightning's default included
    distributed.init_on_fresh_store(f"/syncnorm/{generation}", backend, timeout)
    log.info("torchrun worker group %s (restart count %s): rank %s of %s, %s process group on the store at %s:%s, "
             "prefix /syncnorm/%s", generation, os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"),
             os.environ["RANK"], os.environ["WORLD_SIZE"], backend, os.environ["MASTER_ADDR"],
             os.environ["MASTER_PORT"], generation)
    return True


def exit_now(code: int = 1) -> None:
    """Print the exception being handled, flush the logs and end the process at once (``os._exit``):
    for a failed distributed run whose process group could not be closed (see
    :func:`syncnorm.distributed.shutdown`), which would otherwise hold the interpreter's exit until
    gloo's own timeout. torchrun sees the exit code and can restart the workers."""
    traceback.print_exc()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def resolved_container(cfg: DictConfig) -> dict[str, Any]:
    """The config as a plain resolved dict (``hydra`` node dropped), for logging."""
    out: dict[str, Any] = {}
    for key in cfg:
        if key == "hydra":  # Hydra's own node: not a hyperparameter (and partly unresolvable here)
            continue
        value = cfg[key]
        out[str(key)] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    return out


_LAUNCHER_ENV = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
"""What Lightning's subprocess launcher sets in the launching process (``_SubprocessScriptLauncher``)."""

_HYDRA_VALUE_FLAGS = ("--config-dir", "-cd", "--config-path", "-cp", "--config-name", "-cn")


def _child_argv(argv: list[str], overrides: list[str]) -> list[str]:
    """``argv`` with its Hydra config-folder flags (``--config-dir``, ``--config-path``,
    ``--config-name`` and their short forms) kept, and everything else (``-m``, the sweep's
    overrides) replaced by one job's ``overrides``."""
    kept = [argv[0]]
    args = iter(argv[1:])
    for arg in args:
        name, eq, _ = arg.partition("=")
        if name in _HYDRA_VALUE_FLAGS:
            kept.append(arg)
            if not eq:
                kept.append(next(args, ""))
    return kept + list(overrides)


@contextlib.contextmanager
def ddp_children_run_this_job() -> Iterator[None]:
    """While a multirun job trains, make the DDP processes Lightning starts run this job only.

    Lightning starts ranks 1.. of ``strategy=ddp`` by re-running ``sys.argv`` with
    ``hydra.run.dir=<HydraConfig run.dir>`` appended (``_hydra_subprocess_cmd``). In a multirun
    (``-m``) that command is the whole sweep again, in a second sweep folder, with ``run.dir`` the
    single-run folder. Here, for a ``-m`` job, ``sys.argv`` becomes this job's overrides (Hydra's
    ``hydra.overrides.task``, keeping ``--config-dir``/``--config-path``/``--config-name``) and
    ``run.dir`` the job's folder, so each child is a single run of exactly this job, writing to it.
    Both are restored afterwards, and so are the variables Lightning's launcher sets in the launching
    process (``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_PORT``...): with ``LOCAL_RANK`` left set, the
    next job's Trainer would take the processes as launched externally and wait for a rank 1 that
    nobody starts. Outside a Hydra multirun it does nothing.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        yield
        return
    hydra_cfg = HydraConfig.instance().cfg.hydra  # type: ignore[union-attr]
    saved_argv, saved_dir = sys.argv, hydra_cfg.run.dir
    saved_env = {name: os.environ.get(name) for name in _LAUNCHER_ENV}
    sys.argv = _child_argv(sys.argv, list(hydra_cfg.overrides.task))
    with read_write(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
    try:
        yield
    finally:
        sys.argv = saved_argv
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        with read_write(hydra_cfg):
            hydra_cfg.run.dir = saved_dir


def _override_hint(err: Exception) -> Optional[str]:
    """For Hydra's "Could not override 'a.b'" (a key the config does not have): the keys of ``a``
    that look like ``b`` ("did you mean"), else ``a``'s keys; Hydra's own hint (``+a.b=...``, adding
    the key) is kept only when nothing looks like it, since adding a misspelt key fails later."""
    import difflib

    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    cause = err.__cause__
    text = str(err)
    if not isinstance(cause, (ConfigAttributeError, ConfigKeyError)) or not text.startswith("Could not override"):
        return None
    full_key, key, parent = str(cause.full_key or ""), str(cause.key), cause.parent_node
    if parent is None or not OmegaConf.is_dict(parent):
        return None
    where = full_key.rpartition(".")[0]
    prefix = f"{where}." if where else ""
    keys = [str(k) for k in parent.keys() if str(k) != "hydra"]
    value = text.split("use +", 1)[1].split("=", 1)[1] if "use +" in text and "=" in text.split("use +", 1)[1] else ""
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    head = f"Could not override '{full_key}': {where or 'the config'} has no key '{key}'."
    if close:
        return head + f" Did you mean {prefix}{close[0]}={value}?"
    return (head + f" Its keys: {', '.join(keys)}. To add a new key on purpose: +{text.split('use +', 1)[1]}"
            if "use +" in text else head + f" Its keys: {', '.join(keys)}.")


def _user_error_message(err: Exception) -> Optional[str]:
    """The message to print instead of a traceback for an error in the user's input (the config,
    the overrides, a checkpoint that does not fit), else ``None`` (a real failure: keep the traceback)."""
    from hydra.errors import CompactHydraException
    from omegaconf.errors import OmegaConfBaseException

    from .config import ConfigError

    if isinstance(err, ConfigError):
        return str(err)
    if isinstance(err, CompactHydraException):  # composition: unknown option, unknown key, bad override
        hint = _override_hint(err)
        if hint:
            return hint
        cause = err.__cause__
        return str(err) + (f"\n{cause}" if isinstance(cause, OmegaConfBaseException) else "")
    return None


def exit_with_user_error(err: Exception) -> NoReturn:
    """Print an error in the user's input as one message (rank 0 only: every rank of a torchrun job
    fails the same way) and exit with code 2. Other errors are re-raised."""
    message = _user_error_message(err)
    if message is None:
        raise err
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    if getattr(rank_zero_only, "rank", 0) == 0:
        print(f"syncnorm.train: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2) from None


_FULL_ERROR = "HYDRA_FULL_ERROR"
_saved_full_error: list[Optional[str]] = []  # the user's HYDRA_FULL_ERROR while short_errors() is active


@contextlib.contextmanager
def short_errors() -> Iterator[None]:
    """Around the whole command: an error in the user's input raised while Hydra composes the config
    (an unknown key or option, a bad override) is printed as its message alone, by rank 0 only, and
    the process exits with code 2 (:func:`exit_with_user_error`; the task does the same for a
    :class:`ConfigError` of its own).

    Hydra prints its own errors and exits; ``HYDRA_FULL_ERROR=1`` is set until the task starts (which
    calls :func:`task_started`) so that composition errors reach this handler. Errors inside the task
    are left to Hydra as before (its shortened traceback, exit code 1). A user who sets
    ``HYDRA_FULL_ERROR=1`` gets every traceback.
    """
    if os.environ.get(_FULL_ERROR) == "1":
        yield
        return
    _saved_full_error.append(os.environ.get(_FULL_ERROR))
    os.environ[_FULL_ERROR] = "1"
    try:
        yield
    except Exception as err:  # noqa: BLE001 - sorted below: user errors end here, the rest is re-raised
        if _user_error_message(err) is None:
            raise
        exit_with_user_error(err)
    finally:
        task_started()


def task_started() -> None:
    """Give ``HYDRA_FULL_ERROR`` back its value from before :func:`short_errors` (if it changed it):
    from here on, Hydra reports the task's errors its own way."""
    if _saved_full_error:
        saved = _saved_full_error.pop()
        if saved is None:
            os.environ.pop(_FULL_ERROR, None)
        else:
            os.environ[_FULL_ERROR] = saved
