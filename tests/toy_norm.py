"""A toy norm kind, to prove that a new kind is one file plus one registration.

``ShiftedBatchNorm`` is batch norm whose output is moved by a constant ``shift``. The single
:func:`syncnorm.register_norm` call below is all syncnorm needs: from then on ``"shifted"`` works
in ``create_norm_layer``, ``convert_norms``/``revert_norms``, ``NormConversion``,
``SyncNormLayerSync`` and the app (``imports=[tests.toy_norm]`` and a ``norm`` option file naming
``kind: shifted``). See ``tests/e2e/test_new_kind.py``.
"""

from __future__ import annotations

import numbers

from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

import syncnorm
from syncnorm.rules import Rule


class ShiftedBatchNorm(_BatchNorm):
    """``BatchNorm(x) + shift``, for inputs ``(N, C, *)``."""

    def __init__(self, num_features: int, shift: float = 0.0, eps: float = 1e-5, momentum: float = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.shift = float(shift)

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"ShiftedBatchNorm: expected input (N, C, *), got shape {tuple(input.shape)}")

    def forward(self, input: Tensor) -> Tensor:
        return super().forward(input) + self.shift


SHIFT = Rule("shift", "a real number", lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool))

syncnorm.register_norm("shifted", ShiftedBatchNorm, options={"shift": SHIFT})
