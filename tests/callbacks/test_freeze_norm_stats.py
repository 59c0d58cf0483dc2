"""FreezeNormStats under real DDP: statistics bit-identical, train == eval, affine per flag."""

from __future__ import annotations

import pytest
import torch
from pytorch_lightning.callbacks import BackboneFinetuning

from syncnorm.callbacks import FreezeNormStats, NormConversion
from tests.callbacks._lit import LitNet, Record, load_records, trainer

pytestmark = pytest.mark.distributed

STATS = ("running_mean", "running_var", "num_batches_tracked")


@pytest.mark.parametrize("train_affine", [True, False])
def test_frozen_statistics_survive_a_multi_epoch_ddp_fit(tmp_path, train_affine):
    model = LitNet(lr=0.2, batch_size=4, n=32, shift_per_rank=2.0)  # ranks see different data
    with torch.no_grad():  # non-trivial statistics to freeze
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tr = trainer(tmp_path, max_epochs=3, callbacks=[NormConversion("sync"), FreezeNormStats(train_affine=train_affine),
                                                    Record(str(tmp_path))])
    tr.fit(model)
    for rank, rec in enumerate(load_records(tmp_path)):
        assert set(rec["kinds"].values()) == {"SyncBatchNorm"}
        for k, v in rec["state"].items():
            if k.rsplit(".", 1)[-1] in STATS:
                assert torch.equal(v, before[k]), f"rank {rank}: {k} changed"
        affine = [k for k in before if k.rsplit(".", 1)[-1] in ("weight", "bias") and _is_norm_key(model, k)]
        changed = [k for k in affine if not torch.equal(rec["state"][k], before[k])]
        assert (len(changed) == len(affine)) if train_affine else not changed, changed
        conv = "backbone.1.weight"
        assert not torch.equal(rec["state"][conv], before[conv])  # the rest of the model trained


def _is_norm_key(model, key):
    name = key.rsplit(".", 1)[0]
    return isinstance(model.get_submodule(name), torch.nn.modules.batchnorm._BatchNorm)


def test_frozen_layers_give_eval_output_in_train_mode_after_every_train_call():
    model = LitNet()
    cb = FreezeNormStats(modules="backbone.*")
    cb.setup(None, model, "fit")
    assert cb.frozen == ["backbone.0", "backbone.2", "backbone.5"]
    x = torch.randn(4, 3, 6, 6) * 3 + 1
    model.eval()
    ref = model.backbone(x)
    model.train()  # Lightning does this at every epoch start
    out = model.backbone(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert model.head[1].training  # the head's norm is not selected: still in training mode
    assert cb.state_dict() == {"frozen": ["backbone.0", "backbone.2", "backbone.5"], "train_affine": True}
    with pytest.raises(ValueError, match="no batch-norm layer matches 'backbon.*'"):
        FreezeNormStats(modules="backbon.*").setup(None, LitNet(), "fit")


def test_works_beside_backbone_finetuning_and_resumes_frozen(tmp_path):
    # BackboneFinetuning(train_bn=False) sets track_running_stats=False on the backbone norms, which
    # alone would normalize with batch statistics; FreezeNormStats keeps the running ones in use
    model = LitNet(lr=0.2, batch_size=8, n=32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ft = BackboneFinetuning(unfreeze_backbone_at_epoch=1, train_bn=False)
    tr = trainer(tmp_path, devices=1, max_epochs=2, enable_checkpointing=True,
                 callbacks=[ft, FreezeNormStats(), Record(str(tmp_path))])
    tr.fit(model)
    rec = torch.load(f"{tmp_path}/rank0.pt", weights_only=False)
    for k, v in rec["state"].items():
        if k.rsplit(".", 1)[-1] in STATS:
            assert torch.equal(v, before[k]), k
    ckpt = next(tmp_path.rglob("*.ckpt"))
    state = torch.load(ckpt, weights_only=False)
    assert any("FreezeNormStats" in k for k in state["callbacks"])
    resumed = LitNet(lr=0.2, batch_size=8, n=32)
    cb = FreezeNormStats(modules="head.*")  # narrower selection: the checkpoint's list is re-applied
    tr2 = trainer(tmp_path / "resume", devices=1, max_epochs=3, callbacks=[cb, Record(str(tmp_path / "resume"))])
    (tmp_path / "resume").mkdir(exist_ok=True)
    tr2.fit(resumed, ckpt_path=str(ckpt))
    assert len(cb.frozen) == 4
    rec2 = torch.load(f"{tmp_path}/resume/rank0.pt", weights_only=False)
    for k, v in rec2["state"].items():
        if k.rsplit(".", 1)[-1] in STATS:
            assert torch.equal(v, before[k]), f"after resume: {k}"
