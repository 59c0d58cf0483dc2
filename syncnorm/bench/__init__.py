"""Benchmarks of syncnorm's synchronized layers; one command runs them all::

    python -m syncnorm.bench all [--quick] [--out DIR]     # default DIR: benchmarks/results/<date>/

Each part is also its own entry point (the multi-rank ones under ``torchrun``):

* :mod:`syncnorm.bench.layer`: per-layer forward+backward time of local BatchNorm2d, syncnorm's
  synchronized path (no peer, one-rank group, W ranks), a naive all_gather+autograd reference and
  ``torch.nn.SyncBatchNorm`` (GPU only). ``torchrun --nproc_per_node=2 -m syncnorm.bench.layer``.
* :mod:`syncnorm.bench.step`: full DDP training-step time of a ResNet-18 or ResNet-50 on gloo/CPU
  with four norm variants (local BN, a communication floor, syncnorm, a naive autograd sync BN),
  plus the per-step collective count and a loss-parity check.
  ``torchrun --nproc_per_node=2 -m syncnorm.bench.step [--model resnet50]``.
* :mod:`syncnorm.bench.scaling`: alpha-beta fit of the backend's all_reduce/all_gather and the
  projected per-step BN synchronization cost of ResNet-50 for W = 8 .. 1024 (syncnorm, torch's
  all_gather scheme, naive), with a plot. ``torchrun --nproc_per_node=2 -m syncnorm.bench.scaling``.
* :mod:`syncnorm.bench.memory`: saved-for-backward bytes and peak memory per layer (W=1).
  ``python -m syncnorm.bench.memory``.
"""
