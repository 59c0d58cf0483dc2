"""The app after a normal (non-editable) install: a wheel built from this checkout, installed in a
fresh virtual environment, run from a folder outside the checkout, finds its configs (``conf/`` ships
as ``syncnorm/app/conf/``), and a user's ``--config-dir`` adds a model and a norm option.

The venv sees the system's packages (``--system-site-packages``: torch, Lightning, Hydra are not
downloaded again), so the test proves that ``syncnorm`` is the wheel's copy in the venv and not an
editable install of the system (the configs Hydra used are the venv's, found next to the imported
module), run with ``PYTHONPATH`` unset from a folder outside the checkout."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ._helpers import REPO, check_ok, env

TINY_RUN = ("trainer=cpu", "trainer.max_steps=2", "logger=csv", "model.width=4", "data.batch_size=8",
            "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false")


def _sh(cmd: list[str], cwd: Path, timeout: float = 240) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)
    return check_ok(proc)


def _env() -> dict[str, str]:
    out = env()
    out.pop("PYTHONPATH", None)  # nothing but the venv decides what is imported
    return out


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A venv with the wheel of this checkout installed (not editable); its ``bin`` folder."""
    root = tmp_path_factory.mktemp("packaging")
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    src = root / "src"  # a copy: building in place would leave build/ and *.egg-info in the checkout
    for name in filter(None, files):
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes((REPO / name).read_bytes())
    _sh([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w",
         str(root / "dist"), str(src)], cwd=root)
    wheel = next((root / "dist").glob("syncnorm-*.whl"))
    _sh([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(root / "venv")], cwd=root)
    _sh([sys.executable, "-m", "pip", "--python", str(root / "venv" / "bin" / "python"), "install", "--no-deps",
         "--no-index", str(wheel)], cwd=root)
    return root / "venv" / "bin"


def _only_run(cwd: Path) -> Path:
    runs = list((cwd / "logs" / "train" / "runs").iterdir())
    assert len(runs) == 1, runs
    return runs[0]


def test_installed_command_runs_outside_the_checkout_with_the_packaged_configs(venv, tmp_path):
    out = _sh([str(venv / "syncnorm-train"), *TINY_RUN], cwd=tmp_path)
    run = _only_run(tmp_path)
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "csv" / "metrics.csv").is_file()
    sources = yaml.safe_load((run / ".hydra" / "hydra.yaml").read_text())["hydra"]["runtime"]["config_sources"]
    main = Path(next(s["path"] for s in sources if s["provider"] == "main"))
    # Hydra composed from the installed copy of conf/; config_dir() derives it from the location of the
    # imported syncnorm/app/config.py, so this is also where syncnorm was imported from: the venv
    assert main.parts[-3:] == ("syncnorm", "app", "conf") and main.is_relative_to(venv.parent / "lib"), main
    assert (main / "train.yaml").is_file()
    # the end summary names the run folder, Hydra's saved config and the log file, which holds the run's log
    assert f"  run folder: {run}\n  config: {run / '.hydra'}\n  log: {run / 'train.log'}\n" in out
    log = (run / "train.log").read_text()
    assert "NormConversion: convert_norms(sync)" in log and "syncnorm.train finished:" in log
    assert "in a run of one process" in log  # norm=sync (the default) with trainer=cpu

    # `python -m syncnorm.train` finds the same configs (--cfg job: compose and print, no training)
    job = yaml.safe_load(_sh([str(venv / "python"), "-m", "syncnorm.train", "--cfg", "job", "norm=group"],
                             cwd=tmp_path))
    assert job["norm"]["kind"] == "group" and job["model"]["depth"] == 18


def test_user_config_dir_adds_a_model_and_a_norm_option(venv, tmp_path):
    user = tmp_path / "myconf"
    (user / "model").mkdir(parents=True)
    (user / "norm").mkdir()
    (user / "model" / "tiny.yaml").write_text("defaults:\n  - resnet18\n\nwidth: 4\nstem: imagenet\n")
    (user / "norm" / "mine.yaml").write_text("_target_: syncnorm.callbacks.NormConversion\nkind: group\n"
                                             "num_groups: 2\n")
    work = tmp_path / "work"
    work.mkdir()
    out = _sh([str(venv / "syncnorm-train"), "--config-dir", str(user), "model=tiny", "norm=mine",
               *[a for a in TINY_RUN if not a.startswith("model.")]], cwd=work)
    run = _only_run(work)
    cfg = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    assert cfg["model"]["width"] == 4 and cfg["model"]["stem"] == "imagenet" and cfg["model"]["depth"] == 18
    assert cfg["norm"] == {"_target_": "syncnorm.callbacks.NormConversion", "kind": "group", "num_groups": 2}
    assert "NormConversion: convert_norms(group): 20 layers converted (BatchNorm2d -> GroupNorm x20)" in out
    choices = yaml.safe_load((run / ".hydra" / "hydra.yaml").read_text())["hydra"]["runtime"]["choices"]
    assert choices["model"] == "tiny" and choices["norm"] == "mine"
