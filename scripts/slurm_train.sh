#!/usr/bin/env bash
# Train under SLURM: GPUS_PER_NODE processes on each node, started by srun.
#
#   scripts/slurm_train.sh PARTITION JOB_NAME NODES GPUS_PER_NODE RUN_DIR [overrides...]
#
#   scripts/slurm_train.sh gpu r50 2 8 /shared/runs/r50 experiment=r50_deformable_detr dataset.root=/data/coco
#
# 120 s before the time limit SLURM sends SIGTERM to the training processes (--signal): they stop
# after the current step with a checkpoint in RUN_DIR and exit with status 143 (128 + SIGTERM), on
# which the job requeues itself; the requeued job resumes from RUN_DIR exactly where it stopped.
# Any other status (0: finished, 1: failed, ...) ends the job with it. srun starts the processes
# itself, as torchrun exits 1 whatever their status, and the signal goes to them, not to srun,
# which would kill them on it. Extra sbatch options can go in SBATCH_ARGS.
set -euo pipefail

if [ $# -lt 5 ]; then
    echo "usage: $0 PARTITION JOB_NAME NODES GPUS_PER_NODE RUN_DIR [overrides...]" >&2
    exit 2
fi
PARTITION=$1 JOB_NAME=$2 NODES=$3 GPUS=$4 RUN_DIR=$5
shift 5
CPUS_PER_GPU=${CPUS_PER_GPU:-4}
REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$RUN_DIR"

# 143: the training stopped on SIGTERM with a checkpoint; requeued, the job resumes it
requeue_if_stopped() {
    if [ "$1" -eq 143 ]; then
        scontrol requeue "$SLURM_JOB_ID"
    fi
}

ARGUMENTS=$(printf ' %q' "hydra.run.dir=$RUN_DIR" "$@")
sbatch ${SBATCH_ARGS:-} <<SBATCH
#!/usr/bin/env bash
#SBATCH --partition=$PARTITION
#SBATCH --job-name=$JOB_NAME
#SBATCH --nodes=$NODES
#SBATCH --ntasks-per-node=$GPUS
#SBATCH --gres=gpu:$GPUS
#SBATCH --cpus-per-task=$CPUS_PER_GPU
#SBATCH --output=$RUN_DIR/slurm-%j.out
#SBATCH --signal=TERM@120
#SBATCH --requeue
set -euo pipefail
cd "$REPO"
export MASTER_ADDR=\$(scontrol show hostnames "\$SLURM_JOB_NODELIST" | head -n 1) MASTER_PORT=29500
$(declare -f requeue_if_stopped)
status=0
srun --kill-on-bad-exit=1 bash -c \\
    'export RANK=\$SLURM_PROCID WORLD_SIZE=\$SLURM_NTASKS LOCAL_RANK=\$SLURM_LOCALID; exec python tools/train.py "\$@"' \\
    train$ARGUMENTS || status=\$?
requeue_if_stopped \$status
exit \$status
SBATCH
