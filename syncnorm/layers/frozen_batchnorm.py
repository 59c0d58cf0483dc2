"""``FrozenBatchNorm``: batch norm as a fixed per-channel affine transform."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import rules
from ._base import check_norm_input


class FrozenBatchNorm(nn.Module):
    """Batch norm with fixed statistics and affine parameters: never updates, in any mode.

    ``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias`` (BatchNorm's eval formula,
    the same kernel) in training and eval alike. All four tensors are *buffers*: nothing is trained
    and optimizers do not see them, which is what fine-tuning with small batches wants (the layer is
    as cheap as an affine op and immune to ``.train()``). The ``state_dict`` keys are BatchNorm's
    (``weight``, ``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked``), so torch
    checkpoints load with ``strict=True``. To train the affine part on top of frozen statistics, use
    the ``FreezeNormStats(train_affine=True)`` callback on an ordinary BatchNorm instead.

    Args:
        num_features: C from an expected input of size ``(N, C, *)``.
        eps: added to the variance. Default: 1e-5.

    Shape:
        - Input: ``(N, C, *)``; Output: same shape and dtype.

    Example::

        >>> import torch, syncnorm
        >>> frozen = syncnorm.FrozenBatchNorm(8)
        >>> frozen.load_state_dict(torch.nn.BatchNorm2d(8).state_dict())
        <All keys matched successfully>
        >>> frozen(torch.randn(2, 8, 4, 4)).shape
        torch.Size([2, 8, 4, 4])
    """

    _version = 2

    def __init__(self, num_features: int, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        rules.NUM_FEATURES.check(num_features, "FrozenBatchNorm")
        kw = {"device": device, "dtype": dtype}
        self.num_features, self.eps = num_features, eps
        self.layer_name = None
        self.register_buffer("weight", torch.ones(num_features, **kw))
        self.register_buffer("bias", torch.zeros(num_features, **kw))
        self.register_buffer("running_mean", torch.zeros(num_features, **kw))
        self.register_buffer("running_var", torch.ones(num_features, **kw))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    def forward(self, input: Tensor) -> Tensor:
        check_norm_input(self, input, self.num_features)
        return torch.nn.functional.batch_norm(
            input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # checkpoints of BatchNorm before torch 0.4.1 (version < 2) have no num_batches_tracked
        key = prefix + "num_batches_tracked"
        if key not in state_dict and (local_metadata.get("version") or 0) < 2:
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"
