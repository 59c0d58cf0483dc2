"""Minimal SyncBatchNorm demo: a small CNN on scikit-learn's digits, under torchrun, on CPU (gloo).

    torchrun --standalone --nproc_per_node=2 -m syncnorm.app.demo --epochs 3

Each rank trains on its half of every global batch; SyncBatchNorm makes the batch statistics those
of the global batch. Prints the validation accuracy on rank 0. Without torchrun it runs in one
process (SyncBatchNorm is then plain batch norm).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from syncnorm import SyncBatchNorm, distributed


def _digits(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = (x[perm] - 0.3) / 0.4, y[perm]
    n_val = len(y) // 5
    return x[n_val:], y[n_val:], x[:n_val], y[:n_val]


def _model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), SyncBatchNorm(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), SyncBatchNorm(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8, help="per-rank batch size")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    is_dist = distributed.init_from_launcher("gloo")  # torchrun's environment: join its process group
    rank, world = distributed.rank(), distributed.world_size()
    torch.set_num_threads(1 if is_dist else torch.get_num_threads())
    torch.manual_seed(args.seed)
    xt, yt, xv, yv = _digits(args.seed)
    model = _model()
    net = nn.parallel.DistributedDataParallel(model) if is_dist else model
    opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9)
    global_batch = args.batch_size * world
    for epoch in range(args.epochs):
        net.train()
        perm = torch.randperm(len(yt), generator=torch.Generator().manual_seed(args.seed + epoch))
        for start in range(0, len(yt) - global_batch + 1, global_batch):
            idx = perm[start + rank * args.batch_size: start + (rank + 1) * args.batch_size]
            loss = nn.functional.cross_entropy(net(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            acc = (model(xv).argmax(1) == yv).float().mean().item()
        if rank == 0:
            print(f"epoch {epoch}: loss {loss.item():.4f}  val accuracy {acc:.4f}  "
                  f"(world size {world}, global batch {global_batch})", flush=True)
    distributed.shutdown()
    return acc


if __name__ == "__main__":
    main()
