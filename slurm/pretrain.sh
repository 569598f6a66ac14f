#!/bin/bash
# Pretrain the MoE mapper with DeepSpeed on N nodes x 8 GPUs, one process per GPU (srun).
#
#   sbatch --nodes=4 slurm/pretrain.sh                        # recipe: configs/cc3m_vitb32_gpt2.yaml
#   VLPDIST_CONFIG=configs/x.yaml VLPDIST_OVERRIDES="train.max_steps=20000" sbatch slurm/pretrain.sh
#
# Rendezvous comes from Slurm: MASTER_ADDR is the first host of the allocation, each task's
# RANK/LOCAL_RANK/WORLD_SIZE are SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS.
# Preemption: Slurm sends USR2 to this script 120 s before the time limit (--signal=B:USR2@120),
# or TERM when it preempts; the script passes it to the ranks, which finish their step, write a
# checkpoint and exit 3. The script then requeues the job (`scontrol requeue`), and the rerun
# resumes from the latest checkpoint in train.output_dir. A rank that dies ends the step
# (--kill-on-bad-exit), and the survivors' collectives time out (train.dist_timeout_s): no hang.
#
# Environment: VLPDIST_CONFIG, VLPDIST_OVERRIDES (space-separated key=value), VLPDIST_PYTHON
# (default: python), MASTER_PORT (default: derived from the job id).
#SBATCH --job-name=vlpdist-pretrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR2@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

set -uo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"

PREEMPTED_EXIT_CODE=3  # launcher/train.py: stopped by a signal after writing its checkpoint
export VLPDIST_CONFIG="${VLPDIST_CONFIG:-configs/cc3m_vitb32_gpt2.yaml}"
export VLPDIST_PYTHON="${VLPDIST_PYTHON:-python}"
MASTER_ADDR="$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)"
export MASTER_ADDR
export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"

echo "job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}): ${SLURM_NTASKS} ranks on ${SLURM_JOB_NUM_NODES} nodes," \
     "master ${MASTER_ADDR}:${MASTER_PORT}, config ${VLPDIST_CONFIG} ${VLPDIST_OVERRIDES:-}"

signalled=""
forward_signal() {
    signalled="$1"
    echo "received SIG$1: asking the ranks to checkpoint and stop"
    kill -USR2 "${srun_pid}" 2>/dev/null  # srun forwards it to every task
}
trap 'forward_signal USR2' USR2
trap 'forward_signal TERM' TERM

srun --kill-on-bad-exit=1 bash -c \
    'RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS exec "$VLPDIST_PYTHON" launcher/train.py' &
srun_pid=$!
# A trapped signal interrupts `wait`; keep waiting until srun itself has ended.
while true; do
    wait "${srun_pid}"
    status=$?
    kill -0 "${srun_pid}" 2>/dev/null || break
done

if [[ -n "${signalled}" || ${status} -eq ${PREEMPTED_EXIT_CODE} ]]; then
    echo "checkpoint written; requeueing job ${SLURM_JOB_ID}"
    scontrol requeue "${SLURM_JOB_ID}"
    exit 0
fi
echo "training exited with status ${status}"
exit "${status}"
