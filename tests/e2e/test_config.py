"""The real ``conf/``: every option of every group composes and instantiates; bad values fail early."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from lightning_fabric.utilities.exceptions import MisconfigurationException
from omegaconf import OmegaConf
from torch import nn

from syncnorm import BatchRenorm, FrozenBatchNorm, GhostBatchNorm, SyncBatchNorm, convert_norms
from syncnorm.app.train import CONF_DIR, _net_from_data
from syncnorm.app.config import ConfigError, validate_config
from syncnorm.app.runtime import DDP_BUFFER_SYNC_ARG, instantiate_callbacks, instantiate_loggers
from syncnorm.app.resolvers import launcher_devices, launcher_num_nodes

from ._helpers import compose_cfg, run_cli


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_groups_have_the_documented_options():
    assert _options("model") == ["resnet18", "resnet50", "yolo"]
    assert _options("norm") == ["auto", "batch", "frozen", "ghost", "group", "renorm", "sync"]
    assert _options("data") == ["digits", "shapes"]
    assert _options("trainer") == ["cpu", "ddp_cpu", "ddp_gpu", "default", "gpu", "multinode"]
    assert _options("logger") == ["csv", "none", "wandb"]
    assert _options("callbacks") == ["checkpoint", "default", "freeze_norm_stats", "none", "precise_bn",
                                     "progress_bar", "stat_divergence"]
    assert _options("experiment") == ["finetune_frozen", "small_batch_study", "yolo_shapes"]


def test_every_yaml_option_is_commented():
    """Every ``key: value`` line of every config carries a ``#`` comment (or is a parent key)."""
    missing = []
    for path in CONF_DIR.rglob("*.yaml"):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            body = line.split("#", 1)[0].rstrip()
            if (not body.strip() or body.strip().startswith(("- ", "_target_:")) or "#" in line
                    or body.endswith(":")):
                continue
            missing.append(f"{path.relative_to(CONF_DIR)}:{i + 1}: {line.strip()}")
    assert not missing, "options without a comment:\n" + "\n".join(missing)


@pytest.mark.parametrize("data, model", [("digits", "resnet18"), ("digits", "resnet50"), ("shapes", "yolo")])
def test_models_and_data_instantiate_and_run(tmp_path, data, model):
    cfg = compose_cfg(tmp_path, [f"data={data}", f"model={model}", "model.width=4", "data.batch_size=4"])
    validate_config(cfg)
    dm = instantiate(cfg.data)
    dm.setup("fit")
    module = instantiate(cfg.model, net=_net_from_data(cfg.model.net, dm))
    assert isinstance(module, pl.LightningModule) and module.hparams.width == 4
    images, targets = next(iter(dm.train_dataloader()))
    assert images.shape[0] == 4 and images.shape[1] == dm.in_channels
    out = module(images)
    if model == "yolo":
        assert len(out) == 2 and out[0].shape[1] == 5 + cfg.data.num_classes
        assert torch.isfinite(module.net.loss(out, targets)["loss"])
    else:
        assert out.shape == (4, 10) and module.hparams.depth == int(model[len("resnet"):])


@pytest.mark.parametrize("kind, expected", [
    ("batch", nn.BatchNorm2d), ("sync", SyncBatchNorm), ("ghost", GhostBatchNorm), ("renorm", BatchRenorm),
    ("group", nn.GroupNorm), ("frozen", FrozenBatchNorm), ("auto", nn.BatchNorm2d),
])
def test_every_norm_option_converts_the_model(tmp_path, kind, expected):
    cfg = compose_cfg(tmp_path, [f"norm={kind}", "trainer=cpu"])
    validate_config(cfg)
    callback = instantiate(cfg.norm)
    assert callback.kind == kind
    net = instantiate(cfg.model.net, num_classes=10, in_channels=3, width=4)
    extra = {"per_device_batch": cfg.data.batch_size, "world_size": 1} if kind == "auto" else {}
    convert_norms(net, callback.kind, **callback.options, **extra)  # auto: 32 per device -> batch
    norms = [m for m in net.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
                                                         FrozenBatchNorm))]
    assert len(norms) == 20 and all(type(m) is expected for m in norms), {type(m) for m in norms}
    assert net(torch.randn(4, 3, 16, 16)).shape == (4, 10)


def test_trainer_options(tmp_path, monkeypatch):
    for env in ("LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", "SLURM_NNODES", "SLURM_NTASKS"):
        monkeypatch.delenv(env, raising=False)
    cpu = instantiate(compose_cfg(tmp_path, ["trainer=cpu"]).trainer, logger=False)
    assert cpu.world_size == 1 and cpu.num_devices == 1
    assert not cpu._accelerator_connector.use_distributed_sampler
    ddp = instantiate(compose_cfg(tmp_path, ["trainer=ddp_cpu"]).trainer, logger=False)
    assert type(ddp.strategy).__name__ == "DDPStrategy" and ddp.num_devices == 2 and ddp.num_nodes == 1
    assert ddp.strategy._ddp_kwargs == {}  # DDP's defaults
    # synchronization groups keep their own running statistics: no per-forward copy of rank 0's buffers
    grouped = instantiate(compose_cfg(tmp_path, ["trainer=ddp_cpu", "norm.sync_group_size=1"]).trainer, logger=False)
    assert type(grouped.strategy).__name__ == "DDPStrategy" and grouped.strategy._ddp_kwargs == {DDP_BUFFER_SYNC_ARG: False}
    for overrides, kwargs in ((["norm=renorm", "norm.sync_group_size=2"], {DDP_BUFFER_SYNC_ARG: False}),
                              (["norm=batch"], {})):
        strategy = instantiate(compose_cfg(tmp_path, ["trainer=ddp_gpu", *overrides]).trainer.strategy)
        assert type(strategy).__name__ == "DDPStrategy" and strategy._ddp_kwargs == kwargs, overrides
    multi = instantiate(compose_cfg(tmp_path, ["trainer=multinode"]).trainer, logger=False)
    assert multi.num_devices == 1 and multi.num_nodes == 1
    assert type(multi.strategy).__name__ == "DDPStrategy" and multi.strategy._ddp_kwargs == {DDP_BUFFER_SYNC_ARG: False}
    assert multi.strategy._timeout.total_seconds() == 1800
    for option in ("gpu", "ddp_gpu"):
        cfg = compose_cfg(tmp_path, [f"trainer={option}"])
        assert cfg.trainer.accelerator == "gpu"
        if torch.cuda.is_available():
            assert instantiate(cfg.trainer, logger=False).num_devices >= 1
        else:  # the config is complete: it gets as far as Lightning's hardware check
            with pytest.raises(Exception) as info:
                instantiate(cfg.trainer, logger=False)
            assert isinstance(info.value.__cause__ or info.value, MisconfigurationException)
            assert "No supported gpu backend found" in str(info.value)


def test_process_counts_come_from_the_launcher(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "3")
    cfg = compose_cfg(tmp_path, ["trainer=ddp_cpu"])
    assert (cfg.trainer.devices, cfg.trainer.num_nodes) == (4, 3)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.delenv("GROUP_WORLD_SIZE")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "8")
    monkeypatch.setenv("SLURM_NNODES", "2")
    assert (launcher_devices(1), launcher_num_nodes(1)) == (8, 2)
    monkeypatch.delenv("SLURM_NTASKS_PER_NODE")
    monkeypatch.delenv("SLURM_NNODES")
    assert (launcher_devices(2), launcher_num_nodes(1), launcher_devices(-1)) == (2, 1, -1)


def test_callback_options(tmp_path):
    names = {"default": ["ModelCheckpoint", "StatDivergenceMonitor", "RichProgressBar"], "none": []}
    for option in ("checkpoint", "stat_divergence", "freeze_norm_stats", "precise_bn", "progress_bar"):
        cls = {"checkpoint": "ModelCheckpoint", "stat_divergence": "StatDivergenceMonitor",
               "freeze_norm_stats": "FreezeNormStats", "precise_bn": "PreciseBN",
               "progress_bar": "RichProgressBar"}[option]
        names[option] = [cls]
    for option, expected in names.items():
        cfg = compose_cfg(tmp_path, [f"callbacks={option}"])
        callbacks = instantiate_callbacks(cfg.callbacks)
        assert [type(c).__name__ for c in callbacks] == expected, option
    cfg = compose_cfg(tmp_path, ["trainer.enable_progress_bar=false"])
    assert "RichProgressBar" not in [type(c).__name__ for c in instantiate_callbacks(cfg.callbacks, False)]
    assert instantiate_callbacks(cfg.callbacks)[0].dirpath == str(tmp_path / "checkpoints")


def test_logger_options(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    (wandb,) = instantiate_loggers(compose_cfg(tmp_path, ["logger=wandb"]).logger)
    assert type(wandb).__name__ == "WandbLogger" and wandb._wandb_init["mode"] == "offline"
    assert wandb.save_dir == str(tmp_path)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)  # a configured key means online; nothing is started
    (online,) = instantiate_loggers(compose_cfg(tmp_path, ["logger=wandb"]).logger)
    assert online._wandb_init["mode"] == "online"
    (forced,) = instantiate_loggers(compose_cfg(tmp_path, ["logger=wandb", "logger.wandb.mode=offline"]).logger)
    assert forced._wandb_init["mode"] == "offline"
    (csv,) = instantiate_loggers(compose_cfg(tmp_path, ["logger=csv"]).logger)
    assert Path(csv.log_dir) == tmp_path / "csv"
    assert instantiate_loggers(compose_cfg(tmp_path, ["logger=none"]).logger) == []


def test_experiments_paths_and_hydra_compose(tmp_path):
    study = compose_cfg(tmp_path, ["experiment=small_batch_study"])
    validate_config(study)
    assert study.data.batch_size == 2 and study.task_name == "small_batch_study" and study.norm.kind == "sync"
    yolo = compose_cfg(tmp_path, ["experiment=yolo_shapes"])
    validate_config(yolo)
    assert yolo.model._target_.endswith("DetectionModule") and yolo.data._target_.endswith("ShapesDataModule")
    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(b"")
    fine = compose_cfg(tmp_path, ["experiment=finetune_frozen", f"ckpt_path={ckpt}"])
    validate_config(fine)
    assert fine.finetune.checkpoint == str(ckpt) and fine.model.freeze_backbone is True
    assert fine.callbacks.freeze_norm_stats.train_affine is False and "checkpoint" in fine.callbacks
    assert fine.norm.kind == "batch"
    cfg = compose_cfg(tmp_path, ["hydra/launcher=submitit_slurm"])
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher") and cfg.hydra.launcher.tasks_per_node == 1
    assert cfg.hydra.job.chdir is False
    assert OmegaConf.to_container(cfg.paths, resolve=True)["output_dir"] == str(tmp_path)


@pytest.mark.parametrize("overrides, message", [
    (["model.depth=7"], "model.depth=7: expected one of [18, 50]"),
    (["norm.kind=foo"], "norm.kind='foo': expected one of ['batch', 'sync', 'ghost', 'renorm', 'frozen', 'group'"),
    (["norm=ghost", "norm.virtual_batch_size=64"], "norm.virtual_batch_size=64 is larger than data.batch_size=32"),
    (["norm=group", "norm.num_groups=0"], "norm.num_groups=0: expected an int >= 1"),
    (["+norm.virtual_batch_size=4"], "norm.kind='sync' does not take ['virtual_batch_size']"),
    (["norm.sync_timeout_s=-1"], "norm.sync_timeout_s=-1: expected None (the layers' default) or a number of seconds > 0"),
    (["norm=group", "+norm.sync_timeout_s=5"], "norm.kind='group' does not take ['sync_timeout_s']"),
    (["model=yolo"], "use data=shapes"),
    (["experiment=yolo_shapes", "data.image_size=40"], "data.image_size=40: the YOLO detector needs a multiple of 16"),
    (["experiment=finetune_frozen"], "pass the trained run's checkpoint with ckpt_path="),
    (["ckpt_path=/nonexistent.ckpt"], "ckpt_path='/nonexistent.ckpt': no such file"),
    (["model.optimizer=adam"], "model.optimizer='adam': expected one of ['sgd', 'adamw']"),
    (["trainer.use_distributed_sampler=true"], "trainer.use_distributed_sampler=True: expected false"),
    (["logger.wandb.mode=cloud"], "logger.wandb.mode='cloud': expected null"),
])
def test_invalid_values_are_refused_with_the_valid_ones(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as info:
        validate_config(compose_cfg(tmp_path, overrides))
    assert message in str(info.value)


def test_num_groups_not_dividing_channels_is_fine(tmp_path):
    validate_config(compose_cfg(tmp_path, ["norm=group", "norm.num_groups=7"]))


@pytest.mark.parametrize("override, expected", [
    ("norm=foo", ["Could not find 'norm/foo'", "Available options in 'norm'", "auto", "batch", "frozen", "ghost",
                  "group", "renorm", "sync"]),
])
def test_cli_refuses_bad_overrides(tmp_path, override, expected):
    """A real command line (the value checks' path through a command line:
    ``tests/e2e/test_feedback.py::test_config_error_under_torchrun_is_printed_once_by_rank_zero``)."""
    proc = run_cli([override, "logger=none"], cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    for text in expected:
        assert text in proc.stdout, proc.stdout[-3000:]
