#!/usr/bin/env bash
# Train on several GPUs of one or more machines with torchrun.
#
#   scripts/dist_train.sh GPUS_PER_NODE [overrides...]
#
#   scripts/dist_train.sh 8 experiment=r50_deformable_detr dataset.root=/data/coco
#
# Several machines: run the same command on each, with the same RUN_DIR (a shared file system)
# and the rendezvous of the first machine:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 RUN_DIR=/shared/runs/r50 \
#       scripts/dist_train.sh 8 experiment=r50_deformable_detr dataset.root=/data/coco
#
# Running it again with the same RUN_DIR resumes the run where it stopped.
set -euo pipefail

if [ $# -lt 1 ] || ! [[ "$1" =~ ^[0-9]+$ ]]; then
    echo "usage: $0 GPUS_PER_NODE [overrides...]" >&2
    exit 2
fi
GPUS=$1
shift
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
if [ "$NNODES" -gt 1 ] && [ -z "${RUN_DIR:-}" ]; then
    echo "$0: set RUN_DIR to one directory on a shared file system for all $NNODES machines" >&2
    exit 2
fi
# one run directory for every process (Hydra's default contains the start time, which differs)
RUN_DIR=${RUN_DIR:-outputs/dist/$(date +%Y-%m-%d_%H-%M-%S)}
cd "$(dirname "$0")/.."

exec torchrun \
    --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    tools/train.py "hydra.run.dir=$RUN_DIR" "$@"
