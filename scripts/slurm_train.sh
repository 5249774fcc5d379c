#!/usr/bin/env bash
# Train under SLURM: one torchrun per node, GPUS_PER_NODE processes each.
#
#   scripts/slurm_train.sh PARTITION JOB_NAME NODES GPUS_PER_NODE RUN_DIR [overrides...]
#
#   scripts/slurm_train.sh gpu r50 2 8 /shared/runs/r50 experiment=r50_deformable_detr dataset.root=/data/coco
#
# SLURM sends SIGTERM 120 s before the time limit (or on preemption): training stops after the
# current step with a checkpoint in RUN_DIR, and the job requeues itself; the requeued job resumes
# from RUN_DIR exactly where it stopped. Extra sbatch options can go in SBATCH_ARGS.
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

OVERRIDES=$(printf ' %q' "$@")
sbatch ${SBATCH_ARGS:-} <<SBATCH
#!/usr/bin/env bash
#SBATCH --partition=$PARTITION
#SBATCH --job-name=$JOB_NAME
#SBATCH --nodes=$NODES
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:$GPUS
#SBATCH --cpus-per-task=$((GPUS * CPUS_PER_GPU))
#SBATCH --output=$RUN_DIR/slurm-%j.out
#SBATCH --signal=B:TERM@120
#SBATCH --requeue
set -euo pipefail
cd "$REPO"
head=\$(scontrol show hostnames "\$SLURM_JOB_NODELIST" | head -n 1)
trap 'kill -TERM \$child 2>/dev/null; wait \$child; scontrol requeue \$SLURM_JOB_ID' TERM
srun --kill-on-bad-exit=1 torchrun \\
    --nnodes $NODES --nproc_per_node $GPUS \\
    --rdzv_backend c10d --rdzv_endpoint "\$head:29500" --rdzv_id "\$SLURM_JOB_ID" \\
    tools/train.py hydra.run.dir=$RUN_DIR $OVERRIDES &
child=\$!
wait \$child
SBATCH
