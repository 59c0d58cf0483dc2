#!/usr/bin/env bash
# Multi-node training with torchrun and a c10d rendezvous hosted by node 0. Run this script once on
# every node with the same NNODES, MASTER_ADDR and MASTER_PORT (MASTER_ADDR: node 0's address on the
# network the nodes share).
#
#   # node 0 (10.0.0.1)                                  # node 1
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 \          NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 \
#     NPROC_PER_NODE=8 launch/multinode.sh norm=sync       NPROC_PER_NODE=8 launch/multinode.sh norm=sync
#
# What it derives (no hostname resolution, no 127.0.0.1):
#   - this node's address and interface from the route to MASTER_ADDR (`ip route get`,
#     launch/node_net.sh); on node 0 (and any node on the same machine), MASTER_ADDR itself and the
#     interface that holds it (it must be one of node 0's addresses);
#   - node 0 hosts the rendezvous store (--rdzv-conf is_host=1, the others is_host=0), every node
#     advertises its own address (--local-addr), so the workers' MASTER_ADDR is node 0's address;
#   - GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME: that interface, unless already set;
#   - nodes other than 0 first wait up to RDZV_TIMEOUT seconds for the store to accept connections
#     and otherwise fail, naming the address, the port and the variables to check;
#   - LOGLEVEL=INFO (unless set): torchrun logs the rendezvous result (master_addr, ranks) and restarts;
#   - SYNCNORM_RDZV_ENDPOINT=MASTER_ADDR:MASTER_PORT for the workers: each worker group (a restart, or
#     a node that rejoins) creates its process group on store keys of its own rendezvous round, also
#     when the nodes' torchrun restart counts differ (syncnorm.distributed.worker_generation).
#
# Environment:
#   NNODES          number of nodes (required)
#   NODE_RANK       this node's index, 0..NNODES-1 (required; node 0 hosts the rendezvous; c10d
#                   assigns the final ranks)
#   MASTER_ADDR     node 0's IP address, reachable from every node (required)
#   MASTER_PORT     rendezvous port on node 0 (default 29500)
#   NODE_ADDR       address the other nodes reach this node at (default: node 0: MASTER_ADDR; others:
#                   the source address of the route to MASTER_ADDR)
#   NODE_IFNAME     interface of that address, for GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME (default:
#                   from the same route)
#   GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME   interface gloo / NCCL bind to (default: NODE_IFNAME)
#   RDZV_TIMEOUT    seconds the nodes wait for each other: the store check on nodes > 0, and
#                   torchrun's join_timeout (default 300)
#   NPROC_PER_NODE  processes per node (default: GPUs per node if any, else 1)
#   MAX_RESTARTS    torchrun --max-restarts: worker-group restarts after a failure (default 0); with
#                   ckpt_path=last the job resumes from the run folder's last checkpoint
#   RDZV_ID         rendezvous id shared by the nodes (default: syncnorm-$MASTER_PORT)
#   RDZV_CONF       more torchrun --rdzv-conf entries, comma-separated, e.g. keep_alive_max_attempt=12:
#                   a node whose heartbeats (every keep_alive_interval=5 s) stop for
#                   keep_alive_interval x keep_alive_max_attempt (default 3: 15 s) is dropped from the
#                   rendezvous; raise it to ride out longer link flaps
#   SYNCNORM_RUN_ID run folder name, set the same on every node for one shared folder (default: time)
#   PYTHON          Python interpreter (default: python)
# Arguments are Hydra overrides for `python -m syncnorm.train` (trainer=multinode is prepended: the
# process counts come from torchrun). No hyperparameters here.
set -euo pipefail

die() { echo "multinode.sh (node ${NODE_RANK:-?}): $*" >&2; exit 2; }

: "${NNODES:?set NNODES (number of nodes)}"
: "${NODE_RANK:?set NODE_RANK (this node, 0..NNODES-1)}"
: "${MASTER_ADDR:?set MASTER_ADDR (the address of node 0 on the network the nodes share)}"
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_TIMEOUT=${RDZV_TIMEOUT:-300}
MAX_RESTARTS=${MAX_RESTARTS:-0}
PYTHON=${PYTHON:-python}
[[ $NNODES =~ ^[1-9][0-9]*$ ]] || die "expected NNODES to be a positive integer, got '$NNODES'"
if ! [[ $NODE_RANK =~ ^[0-9]+$ ]] || (( NODE_RANK >= NNODES )); then
  die "expected NODE_RANK in 0..$((NNODES - 1)), got '$NODE_RANK'"
fi
[[ $MASTER_PORT =~ ^[0-9]+$ ]] || die "expected MASTER_PORT to be a port number, got '$MASTER_PORT'"
[[ $RDZV_TIMEOUT =~ ^[1-9][0-9]*$ ]] || die "expected RDZV_TIMEOUT in whole seconds > 0, got '$RDZV_TIMEOUT'"

# This node's address and interface, from the kernel's route to MASTER_ADDR (launch/node_net.sh).
# shellcheck source=launch/node_net.sh
source "$(dirname "${BASH_SOURCE[0]}")/node_net.sh"
node_net "$NODE_RANK"
export LOGLEVEL=${LOGLEVEL:-INFO}  # torchrun prints the rendezvous result (master_addr, ranks) and restarts

if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
  if (( GPUS > 0 )); then NPROC_PER_NODE=$GPUS; else NPROC_PER_NODE=1; fi
fi
RDZV_ID=${RDZV_ID:-syncnorm-$MASTER_PORT}
export SYNCNORM_RUN_ID=${SYNCNORM_RUN_ID:-$(date +%Y-%m-%d_%H)-$RDZV_ID}
echo "multinode.sh: node $NODE_RANK/$NNODES at $NODE_ADDR ($NODE_IFNAME), rendezvous $MASTER_ADDR:$MASTER_PORT," \
     "GLOO_SOCKET_IFNAME=$GLOO_SOCKET_IFNAME NCCL_SOCKET_IFNAME=$NCCL_SOCKET_IFNAME"

# Nodes > 0: wait (bounded) until node 0's store accepts connections, instead of torchrun's
# less specific connect timeout.
if (( NODE_RANK > 0 )); then
  deadline=$((SECONDS + RDZV_TIMEOUT))
  until timeout 2 bash -c "exec 3<>/dev/tcp/$MASTER_ADDR/$MASTER_PORT" 2>/dev/null; do
    if (( SECONDS >= deadline )); then
      die "no rendezvous at $MASTER_ADDR:$MASTER_PORT after ${RDZV_TIMEOUT} s (from $NODE_ADDR on \
$NODE_IFNAME). Is node 0 running with the same MASTER_PORT? Check MASTER_ADDR (node 0's address on \
a network every node shares) and MASTER_PORT (open in node 0's firewall); wait longer with RDZV_TIMEOUT=<s>."
    fi
    sleep 1
  done
fi

is_host=$(( NODE_RANK == 0 ? 1 : 0 ))
export SYNCNORM_RDZV_ENDPOINT="$MASTER_ADDR:$MASTER_PORT"
cmd=("$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --node-rank="$NODE_RANK"
     --nproc-per-node="$NPROC_PER_NODE" --max-restarts="$MAX_RESTARTS"
     --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$RDZV_ID"
     --rdzv-conf="is_host=$is_host,join_timeout=$RDZV_TIMEOUT${RDZV_CONF:+,$RDZV_CONF}" --local-addr="$NODE_ADDR"
     -m syncnorm.train trainer=multinode "$@")
echo "+ SYNCNORM_RUN_ID=$SYNCNORM_RUN_ID ${cmd[*]}"
exec "${cmd[@]}"
