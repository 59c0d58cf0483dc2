"""What the command says when the user's input is wrong: one short message (rank 0 under torchrun),
a "did you mean" for a misspelt key, the origin of a checkpoint that does not fit the model."""

from __future__ import annotations

import sys

import pytest

from syncnorm.app.config import ConfigError
from syncnorm.app.train import main, train

from ._helpers import TINY, compose_cfg, run_cli


def _main_exit(monkeypatch, capsys, tmp_path, *args: str) -> tuple[int, str]:
    """``syncnorm-train args`` in this process (composition errors end before any training):
    ``(exit code, stderr)``."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setattr(sys, "argv", ["syncnorm-train", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    return exc.value.code, capsys.readouterr().err


def test_misspelt_key_says_did_you_mean_instead_of_adding_it(monkeypatch, capsys, tmp_path):
    code, err = _main_exit(monkeypatch, capsys, tmp_path, "trainer.max_step=3")
    assert code == 2
    assert err.strip() == ("syncnorm.train: Could not override 'trainer.max_step': trainer has no key 'max_step'. "
                           "Did you mean trainer.max_steps=3?")
    code, err = _main_exit(monkeypatch, capsys, tmp_path, "nrom=batch")  # a group name, at the root
    assert code == 2 and "the config has no key 'nrom'. Did you mean norm=batch?" in err
    code, err = _main_exit(monkeypatch, capsys, tmp_path, "model.zzz=1")  # nothing alike: the keys, and "+"
    assert code == 2 and "model has no key 'zzz'. Its keys: _target_, depth, width" in err and "+model.zzz=1" in err
    assert "Traceback" not in err


def test_hydra_full_error_keeps_the_traceback(monkeypatch, tmp_path):
    from hydra.errors import ConfigCompositionException

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    monkeypatch.setattr(sys, "argv", ["syncnorm-train", "trainer.max_step=3"])
    with pytest.raises(ConfigCompositionException, match="Could not override 'trainer.max_step'"):
        main()


def test_unknown_option_is_one_message(monkeypatch, capsys, tmp_path):
    code, err = _main_exit(monkeypatch, capsys, tmp_path, "norm=bath")
    assert code == 2 and "Could not find 'norm/bath'" in err and "\tbatch\n" in err and "Traceback" not in err
    assert len(err.splitlines()) < 16, err


@pytest.mark.distributed
def test_config_error_under_torchrun_is_printed_once_by_rank_zero(tmp_path):
    proc = run_cli(["model.depth=7", "logger=csv", f"paths.log_dir={tmp_path}/logs"], cwd=tmp_path,
                   torchrun=["--standalone", "--nproc_per_node=2"])
    assert proc.returncode != 0
    out = proc.stdout
    assert out.count("syncnorm.train: invalid config (1 problem):\n  - model.depth=7: expected one of [18, 50]") == 1
    assert "exitcode  : 2" in out  # torchrun's own report: both ranks exit with code 2
    assert "syncnorm/app" not in out and "Error executing job" not in out  # no traceback of ours, no Hydra banner


@pytest.mark.distributed  # uses the shared 2-process run's checkpoint (resnet18, width 8, norm=sync)
def test_finetune_checkpoint_of_another_model_names_what_wrote_it(ddp_run, tmp_path):
    source = ddp_run.dir / "checkpoints" / "last.ckpt"
    cfg = compose_cfg(tmp_path, [*TINY, "model.width=16", f"finetune.checkpoint={source}", "trainer=cpu",
                                 "logger=none"])
    with pytest.raises(ConfigError) as exc:
        train(cfg)
    message = str(exc.value)
    assert message.startswith(f"finetune.checkpoint={source} does not fit this model: it was written by a model "
                              "with depth=18, width=8, stem='small' and norm=sync.")
    assert "  differing settings: model.width=8 (this run: 16)\n" in message
    assert "0 missing, 0 unexpected, 101 of another shape (e.g. net.bn1.bias: (8,) in the checkpoint, (16,) here)" \
        in message
    assert len(message.splitlines()) == 4  # instead of torch's list of every mismatching key
