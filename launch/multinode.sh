#!/usr/bin/env bash
# Multi-node training with torchrun and a c10d rendezvous. Run this script once on every node with
# the same MASTER_ADDR/MASTER_PORT (the rendezvous endpoint, e.g. node 0's address).
#
#   # node 0                                             # node 1
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 \          NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 \
#     NPROC_PER_NODE=8 launch/multinode.sh norm=sync       NPROC_PER_NODE=8 launch/multinode.sh norm=sync
#
# Environment:
#   NNODES          number of nodes (required)
#   NODE_RANK       this node's index, 0..NNODES-1 (required; c10d assigns the final ranks, the
#                   value keeps logs readable)
#   MASTER_ADDR     address of the rendezvous host, reachable from every node (required)
#   MASTER_PORT     rendezvous port (default 29500)
#   NPROC_PER_NODE  processes per node (default: GPUs per node if any, else 1)
#   RDZV_ID         rendezvous id shared by the nodes (default: syncnorm-$MASTER_PORT)
#   SYNCNORM_RUN_ID run folder name, set the same on every node for one shared folder (default: time)
#   PYTHON          Python interpreter (default: python)
# Arguments are Hydra overrides for `python -m syncnorm.train` (trainer=multinode is prepended: the
# process counts come from torchrun). No hyperparameters here.
set -euo pipefail

: "${NNODES:?set NNODES (number of nodes)}"
: "${NODE_RANK:?set NODE_RANK (this node, 0..NNODES-1)}"
: "${MASTER_ADDR:?set MASTER_ADDR (rendezvous host)}"
MASTER_PORT=${MASTER_PORT:-29500}
PYTHON=${PYTHON:-python}
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
  if (( GPUS > 0 )); then NPROC_PER_NODE=$GPUS; else NPROC_PER_NODE=1; fi
fi
RDZV_ID=${RDZV_ID:-syncnorm-$MASTER_PORT}
export SYNCNORM_RUN_ID=${SYNCNORM_RUN_ID:-$(date +%Y-%m-%d_%H)-$RDZV_ID}

cmd=("$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --node_rank="$NODE_RANK"
     --nproc_per_node="$NPROC_PER_NODE" --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT"
     --rdzv_id="$RDZV_ID" -m syncnorm.train trainer=multinode "$@")
echo "+ SYNCNORM_RUN_ID=$SYNCNORM_RUN_ID ${cmd[*]}"
exec "${cmd[@]}"
