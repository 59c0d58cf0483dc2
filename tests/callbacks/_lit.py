"""A tiny LightningModule and data for callback tests (importable by spawned DDP workers).

Both Lightning namespaces: ``LitNet`` is a ``pytorch_lightning.LightningModule``, ``LitNetL`` the
same module as a ``lightning.pytorch.LightningModule`` (a Trainer accepts only its own namespace's
modules); ``lit_net(ns, ...)`` and ``trainer(..., ns=...)`` pick one by name (``NAMESPACES``).
"""

from __future__ import annotations

import lightning.pytorch as L
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset


def make_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    backbone = nn.Sequential(
        nn.BatchNorm2d(3),  # first layer on the raw input: its statistics are the data's
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )
    head = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))
    return nn.Sequential(backbone, head)


def dataset(n: int = 64, seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 6, 6, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    return TensorDataset(x, y)


class _LitBody:
    """``shift_per_rank``: add ``shift * rank`` to the inputs (divergent ranks); ``same_data``: every
    rank trains on the same batch (identical statistics)."""

    def __init__(self, lr: float = 0.1, batch_size: int = 4, n: int = 64, shift_per_rank: float = 0.0,
                 same_data: bool = False, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        net = make_net(seed)
        self.backbone, self.head = net[0], net[1]

    def forward(self, x):
        return self.head(self.backbone(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.hparams.same_data:
            g = torch.Generator().manual_seed(1000 + batch_idx)
            x = torch.randn(x.shape, generator=g)
        x = x + self.hparams.shift_per_rank * self.global_rank
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    def train_dataloader(self):
        # explicit DistributedSampler(shuffle=False): rank r gets samples r, r+W, ..., so the union of
        # the ranks' step-t batches is the contiguous single-process batch t (tests rely on it)
        data = dataset(self.hparams.n)
        sampler = None
        if self.trainer is not None and self.trainer.world_size > 1:
            sampler = DistributedSampler(data, num_replicas=self.trainer.world_size,
                                         rank=self.trainer.global_rank, shuffle=False)
        return DataLoader(data, batch_size=self.hparams.batch_size, shuffle=False, sampler=sampler)

    def val_dataloader(self):
        return DataLoader(dataset(16, seed=2), batch_size=8)


class LitNet(_LitBody, pl.LightningModule):
    """The test module for ``pytorch_lightning.Trainer``."""


class LitNetL(_LitBody, L.LightningModule):
    """The test module for ``lightning.pytorch.Trainer``."""


NAMESPACES = {"pytorch_lightning": (pl, LitNet), "lightning.pytorch": (L, LitNetL)}
"""namespace name -> (its module, the test LightningModule of that namespace)."""


def lit_net(ns: str = "pytorch_lightning", **kw) -> pl.LightningModule:
    return NAMESPACES[ns][1](**kw)


def trainer(tmp_path, devices: int = 2, ns: str = "pytorch_lightning", **kw) -> pl.Trainer:
    defaults = dict(accelerator="cpu", devices=devices, strategy="ddp_fork" if devices > 1 else "auto",
                    max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=str(tmp_path), num_sanity_val_steps=0,
                    limit_val_batches=0, use_distributed_sampler=False)
    defaults.update(kw)
    return NAMESPACES[ns][0].Trainer(**defaults)


class Record(pl.Callback):
    """Writes, on every rank at the end of fit, what the tests need from inside a spawned worker:
    the norm layers' class names during training and the final state (parameters and buffers) to
    ``<folder>/rank<r>.pt``."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_start(self, trainer, pl_module):  # after every conversion, before any revert
        self.kinds = {n: type(m).__name__ for n, m in pl_module.named_modules() if "Norm" in type(m).__name__}

    def on_fit_end(self, trainer, pl_module):
        kinds = self.kinds
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        extra = {k: v for k, v in vars(pl_module).items() if k.startswith("record_")}
        torch.save({"kinds": kinds, "state": state, "extra": extra}, f"{self.folder}/rank{trainer.global_rank}.pt")


def load_records(folder, world: int = 2) -> list[dict]:
    return [torch.load(f"{folder}/rank{r}.pt", weights_only=False) for r in range(world)]
