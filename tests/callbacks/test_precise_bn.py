"""PreciseBN under real DDP: running statistics become the population statistics of the data."""

from __future__ import annotations

import pytest
import torch

from syncnorm.callbacks import FreezeNormStats, NormConversion, PreciseBN
from tests.callbacks._lit import LitNet, Record, dataset, load_records, trainer

pytestmark = pytest.mark.distributed


def test_population_statistics_over_all_ranks_equal_float64_reference(tmp_path):
    n = 48
    model = LitNet(batch_size=4, n=n, shift_per_rank=1.5)  # rank 1 adds 1.5 to its inputs
    tr = trainer(tmp_path, max_epochs=1, callbacks=[NormConversion("sync"), PreciseBN(num_batches=100),
                                                     FreezeNormStats(modules="head.*"), Record(str(tmp_path))])
    before_head = {k: v.clone() for k, v in model.head.state_dict().items()}
    tr.fit(model)
    # PreciseBN's forward is `pl_module(batch[0])`: the raw inputs, rank 1's not shifted (the shift is
    # in training_step), so layer backbone.0 sees the whole data set exactly once over both ranks
    x = dataset(n).tensors[0].double()
    mean = x.mean((0, 2, 3))
    var = x.var((0, 2, 3), unbiased=True)
    for rank, rec in enumerate(load_records(tmp_path)):
        torch.testing.assert_close(rec["state"]["backbone.0.running_mean"].double(), mean, rtol=0, atol=1e-6)
        torch.testing.assert_close(rec["state"]["backbone.0.running_var"].double(), var, rtol=1e-6, atol=1e-6)
        for k in ("1.running_mean", "1.running_var"):  # frozen layers are skipped
            assert torch.equal(rec["state"][f"head.{k}"], before_head[k]), k
