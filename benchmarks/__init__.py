"""Benchmarks of syncnorm's synchronized layers (not part of the installed package: run them from
the repository root, beside their recorded results in ``benchmarks/results/``); one command runs
them all::

    python -m benchmarks all [--quick] [--out DIR]     # default DIR: benchmarks/results/<date>/

Shared CLI and report code (torchrun entry, machine description, timing, tables, result files) is
in :mod:`benchmarks.common`.

Each part is also its own entry point (the multi-rank ones under ``torchrun``):

* :mod:`benchmarks.layer`: per-layer forward+backward time of local BatchNorm2d, syncnorm's
  synchronized path (no peer, one-rank group, W ranks), a naive all_gather+autograd reference and
  ``torch.nn.SyncBatchNorm`` (GPU only). ``torchrun --nproc_per_node=2 -m benchmarks.layer``.
* :mod:`benchmarks.step`: full DDP training-step time of a ResNet-18 or ResNet-50 on gloo/CPU
  with four norm variants (local BN, a communication floor, syncnorm, a naive autograd sync BN),
  plus the per-step collective count and a loss-parity check.
  ``torchrun --nproc_per_node=2 -m benchmarks.step [--model resnet50]``.
* :mod:`benchmarks.scaling`: alpha-beta fit of the backend's all_reduce/all_gather and the
  projected per-step BN synchronization cost of ResNet-50 for W = 8 .. 1024 (syncnorm, torch's
  all_gather scheme, naive), with a plot. ``torchrun --nproc_per_node=2 -m benchmarks.scaling``.
* :mod:`benchmarks.memory`: saved-for-backward bytes and peak memory per layer (W=1).
  ``python -m benchmarks.memory``.
* :mod:`benchmarks.compiled`: eager vs ``torch.compile`` step time of a SyncBatchNorm ResNet-18.
  ``torchrun --nproc_per_node=2 -m benchmarks.compiled``.
* :mod:`benchmarks.study`: the small-batch study (trains with the app). ``python -m benchmarks.study``.
"""
