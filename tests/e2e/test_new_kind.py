"""A new norm kind is one file plus one registration: the toy kind of ``tests/toy_norm.py``
(``ShiftedBatchNorm``, ``register_norm("shifted", ...)``) works through ``convert_norms`` /
``revert_norms``, ``NormConversion``, ``SyncNormLayerSync`` and ``norm=shifted`` in the app, with
nothing else added to syncnorm."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from torch import nn

import syncnorm
from syncnorm.app.config import ConfigError, validate_config
from syncnorm.app.train import CONF_DIR
from syncnorm.callbacks import NormConversion
from syncnorm.lightning import SyncNormLayerSync
from tests.callbacks._lit import LitNet, Record, load_records, trainer
from tests.toy_norm import ShiftedBatchNorm

from ._helpers import TINY, check_ok, run_cli

REPO = Path(__file__).resolve().parents[2]

NORM_FILE = """\
# @package _global_
# A norm option for a kind registered by user code: imported first, then named (tests/toy_norm.py).
imports: [tests.toy_norm]   # registers the kind "shifted"
norm:
  _target_: syncnorm.callbacks.NormConversion
  kind: shifted             # ShiftedBatchNorm
  shift: 0.5                # constant added to every output
"""


def _cnn() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(5),
                        nn.BatchNorm1d(5))
    net(torch.randn(6, 3, 5, 5))  # materialize the lazy layer, train the running statistics a little
    return net.eval()


def test_convert_norms_and_revert_norms():
    assert "shifted" in syncnorm.norm_kinds()
    net = _cnn()
    x = torch.randn(2, 3, 5, 5)
    before = [net[1](net[0](x)), net[5](torch.randn(2, 5))]
    weight, running_mean = net[1].weight, net[5].running_mean
    syncnorm.convert_norms(net, "shifted", shift=0.5)
    assert type(net[1]) is ShiftedBatchNorm and type(net[5]) is ShiftedBatchNorm
    assert net[1].shift == 0.5 and net[1].layer_name == "1" and not net[1].training
    assert net[1].weight is weight and net[5].running_mean is running_mean  # shared, not copied
    torch.testing.assert_close(net[1](net[0](x)), before[0] + 0.5, rtol=0, atol=1e-6)
    syncnorm.revert_norms(net)
    assert type(net[1]) is nn.BatchNorm2d and type(net[5]) is nn.BatchNorm1d and net[1].weight is weight
    torch.testing.assert_close(net[1](net[0](x)), before[0], rtol=0, atol=0)
    assert syncnorm.create_norm_layer("SHIFTED", 3, shift=2.0).shift == 2.0
    with pytest.raises(ValueError, match=r"convert_norms\(kind='shifted'\): expected shift to be a real number, got 'x'"):
        syncnorm.convert_norms(_cnn(), "shifted", shift="x")
    with pytest.raises(ValueError, match=r"unknown options \['num_groups'\]; expected some of \['shift'\]"):
        syncnorm.convert_norms(_cnn(), "shifted", num_groups=2)
    with pytest.raises(ValueError, match=r"unknown norm kind 'shiftd'; expected one of \[.*'shifted'"):
        syncnorm.convert_norms(_cnn(), "shiftd")


def test_norm_conversion_and_layer_sync(tmp_path):
    tr = trainer(tmp_path, devices=1, max_steps=2, callbacks=[NormConversion("shifted", shift=0.25),
                                                               Record(str(tmp_path))])
    tr.fit(LitNet(batch_size=4, n=8))
    (record,) = load_records(tmp_path, world=1)
    assert set(record["kinds"].values()) == {"ShiftedBatchNorm"} and len(record["kinds"]) == 4
    with pytest.raises(ValueError, match=r"sync_group_size applies to kinds \['sync', .*got kind 'shifted'"):
        NormConversion("shifted", sync_group_size=2)
    with pytest.raises(ValueError, match=r"NormConversion\('shifted'\): expected shift to be a real number"):
        NormConversion("shifted", shift=None)
    plugin = SyncNormLayerSync("shifted", shift=1.0)
    net = plugin.apply(_cnn())
    assert type(net[1]) is ShiftedBatchNorm and net[1].shift == 1.0
    assert type(plugin.revert(net)[1]) is nn.BatchNorm2d


def _compose(conf: Path, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=[f"hydra.searchpath=[file://{conf}]", *overrides])


def test_norm_option_of_the_app(tmp_path):
    conf = tmp_path / "conf"
    (conf / "norm").mkdir(parents=True)
    (conf / "norm" / "shifted.yaml").write_text(NORM_FILE)
    validate_config(_compose(conf, ["norm=shifted"]))
    with pytest.raises(ConfigError, match=r"norm.shift='big': expected a real number"):
        validate_config(_compose(conf, ["norm=shifted", "norm.shift=big"]))
    # the real command, in a fresh process: the user's config folder adds the option
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    proc = run_cli(["--config-dir", str(conf), "norm=shifted", "trainer=cpu", *TINY, "logger=csv",
                    f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, extra_env={"PYTHONPATH": pythonpath})
    output = check_ok(proc)
    assert "convert_norms(shifted): 20 layers converted (BatchNorm2d -> ShiftedBatchNorm x20)" in output, output[-3000:]
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 6 and "net.layer1.0.bn1.running_mean" in ckpt["state_dict"]
