"""syncnorm's Lightning classes with one namespace installed, the other, both, or neither.

The DDP proofs under both Trainers are the parametrized tests of ``test_norm_conversion.py`` and
``test_layer_sync.py``; here each case runs in a fresh interpreter where the other package is made
unimportable (``sys.modules[name] = None``, as if it were not installed) before syncnorm is imported.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

_FIT = textwrap.dedent("""
    import sys
    for name in {blocked!r}:
        sys.modules[name] = None  # as if not installed
    import importlib
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from syncnorm import _lightning_compat
    from syncnorm.callbacks import FreezeNormStats, NormConversion, PreciseBN, StatDivergenceMonitor
    from syncnorm.lightning import SyncNormLayerSync

    assert _lightning_compat.installed_namespaces() == [{ns!r}], _lightning_compat.installed_namespaces()
    ns = importlib.import_module({ns!r})
    layer_sync = importlib.import_module({ns!r} + ".plugins.layer_sync").LayerSync
    assert isinstance(SyncNormLayerSync(), layer_sync)
    for cls in (FreezeNormStats, NormConversion, PreciseBN, StatDivergenceMonitor):
        assert cls.__bases__ == (ns.Callback,), (cls, cls.__bases__)

    class Tiny(ns.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(36, 2))
        def training_step(self, batch, i):
            return self.net(batch[0]).square().mean()
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)
        def train_dataloader(self):
            return DataLoader(TensorDataset(torch.randn(8, 3, 3, 3)), batch_size=4)

    def trainer(**kw):
        return ns.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, **kw)

    model = Tiny()
    tr = trainer(plugins=[SyncNormLayerSync("sync")], callbacks=[NormConversion("ghost", virtual_batch_size=2)])
    tr.fit(model)
    assert tr.global_step == 2 and type(model.net[1]).__name__ == "GhostBatchNorm", type(model.net[1])
    try:
        trainer(sync_batchnorm=True, callbacks=[NormConversion("sync")]).fit(Tiny())
    except RuntimeError as e:
        assert "cannot be combined with Trainer(sync_batchnorm=True)" in str(e), e
    else:
        raise AssertionError("sync_batchnorm=True was not refused")
    print("OK", {ns!r})
""")


def _run(script: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p))
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("ns, blocked", [("lightning.pytorch", ("pytorch_lightning",)),
                                         ("pytorch_lightning", ("lightning",))])
def test_works_with_only_one_package_installed(ns, blocked):
    # fit with the plugin and a callback, and the sync_batchnorm=True guard, in that namespace alone
    proc = _run(_FIT.format(ns=ns, blocked=blocked))
    assert proc.returncode == 0 and f"OK {ns}" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_without_lightning_the_error_names_the_packages():
    proc = _run("import sys\nsys.modules['pytorch_lightning'] = sys.modules['lightning'] = None\n"
                "import syncnorm\nprint('syncnorm imported', flush=True)\nimport syncnorm.callbacks\n")
    assert proc.returncode == 1 and "syncnorm imported" in proc.stdout  # the library itself needs no Lightning
    assert "ImportError: syncnorm's Lightning integration" in proc.stderr, proc.stderr[-2000:]
    assert "pip install 'syncnorm[lightning]'" in proc.stderr


def test_one_class_serves_both_namespaces_when_both_are_installed():
    import lightning.pytorch as L
    import pytorch_lightning as pl
    from lightning.pytorch.plugins.layer_sync import LayerSync as LayerSyncL
    from pytorch_lightning.plugins.layer_sync import LayerSync as LayerSyncPL

    from syncnorm.callbacks import NormConversion
    from syncnorm.lightning import SyncNormLayerSync

    assert isinstance(NormConversion("sync"), pl.Callback) and isinstance(NormConversion("sync"), L.Callback)
    plugin = SyncNormLayerSync()
    assert isinstance(plugin, LayerSyncPL) and isinstance(plugin, LayerSyncL)
