"""Benchmarks of syncnorm's synchronized layers; each is a ``torchrun`` entry point.

* :mod:`syncnorm.bench.step`: full DDP training-step time of a ResNet-18 on gloo/CPU with four
  norm variants (local BN, a communication floor, syncnorm, a naive autograd sync BN), plus the
  per-step collective count and a loss-parity check. Run it with
  ``torchrun --nproc_per_node=2 -m syncnorm.bench.step``.
"""
