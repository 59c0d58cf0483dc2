#!/usr/bin/env bash
# Single-node training with torchrun, on CPU (gloo) or GPUs (NCCL).
#
#   NPROC=2 launch/torchrun.sh                                  # 2 CPU processes, the main job
#   NPROC=4 launch/torchrun.sh trainer=ddp_gpu model=resnet50   # 4 GPUs
#
# Environment (all optional):
#   NPROC     processes on this machine (default: number of GPUs if any, else 2)
#   PYTHON    Python interpreter (default: python)
#   TRAINER   trainer config (default: ddp_gpu when NPROC GPUs are visible, else ddp_cpu); an explicit
#             trainer=... among the arguments wins
# Every argument is passed to `python -m syncnorm.train` as a Hydra override. No hyperparameters here.
set -euo pipefail

PYTHON=${PYTHON:-python}
GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [[ -z "${NPROC:-}" ]]; then
  if (( GPUS > 0 )); then NPROC=$GPUS; else NPROC=2; fi
fi
if [[ -z "${TRAINER:-}" ]]; then
  if (( GPUS >= NPROC )); then TRAINER=ddp_gpu; else TRAINER=ddp_cpu; fi
fi
# one run folder for every rank (see conf/hydra/default.yaml)
export SYNCNORM_RUN_ID=${SYNCNORM_RUN_ID:-$(date +%Y-%m-%d_%H-%M-%S)}

cmd=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC"
     -m syncnorm.train "trainer=$TRAINER" "$@")
echo "+ SYNCNORM_RUN_ID=$SYNCNORM_RUN_ID ${cmd[*]}"
exec "${cmd[@]}"
