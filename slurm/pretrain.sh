#!/bin/bash
# Pretrain the MoE mapper with DeepSpeed on N nodes x 8 GPUs, one process per GPU (srun).
#
#   sbatch --nodes=4 slurm/pretrain.sh                        # recipe: configs/cc3m_vitb32_gpt2.yaml
#   VLPDIST_CONFIG=configs/x.yaml VLPDIST_OVERRIDES="train.max_steps=20000" sbatch slurm/pretrain.sh
#
# Rendezvous comes from Slurm: MASTER_ADDR is the first host of the allocation, each task's
# RANK/LOCAL_RANK/WORLD_SIZE are SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS.
#
# Stopping. Every stop signal makes the ranks finish their step and write a checkpoint; rank 0 then
# writes a marker file (VLPDIST_STOP_MARKER) and every rank exits 0, so `--kill-on-bad-exit` never
# takes a planned stop for a failure. What follows depends on why the job was signalled:
# - `scancel <job>` (SIGTERM to every process of the job, SIGKILL after the cluster's KillWait):
#   the job ends CANCELLED and is not requeued.
# - SIGUSR2 (`--signal=B:USR2@120` before the time limit, or `scancel --signal=USR2 <job>`) or
#   Slurm's own preemption (SIGTERM with the job's PreemptTime set): the script requeues the job
#   (`scontrol requeue`) and the rerun resumes from the latest checkpoint in train.output_dir, at
#   most VLPDIST_MAX_RESTARTS times (default 20, counted by SLURM_RESTART_COUNT).
# - another SIGTERM (e.g. `kill`, `scancel --signal=TERM`): checkpoint, no requeue.
# A rank that dies ends the step (--kill-on-bad-exit), and the survivors' collectives time out
# (train.dist_timeout_s): no hang. A signal after the training steps (export, evaluation) stops
# them: the run is not requeued, and a rerun finishes them from the last checkpoint.
#
# Exit status: 0 finished, or stopped with a checkpoint and requeued, or cancelled by scancel after
# its checkpoint; 3 stopped with a checkpoint and not requeued (restart cap, or a SIGTERM that was
# neither scancel nor preemption): resubmit to resume; 4 `scontrol requeue` failed after the
# checkpoint: resubmit to resume; any other non-zero: the run failed (srun's status).
#
# Environment: VLPDIST_CONFIG, VLPDIST_OVERRIDES (space-separated key=value), VLPDIST_PYTHON
# (default: python), VLPDIST_MAX_RESTARTS (default 20), VLPDIST_STOP_MARKER (default
# .vlpdist-stop-<job id> in the submit folder; must be a path every node sees), MASTER_PORT
# (default: derived from the job id, below the first node's ephemeral port range).
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

STOPPED_NOT_REQUEUED_EXIT_CODE=3
REQUEUE_FAILED_EXIT_CODE=4
export VLPDIST_CONFIG="${VLPDIST_CONFIG:-configs/cc3m_vitb32_gpt2.yaml}"
export VLPDIST_PYTHON="${VLPDIST_PYTHON:-python}"
export VLPDIST_STOP_MARKER="${VLPDIST_STOP_MARKER:-${PWD}/.vlpdist-stop-${SLURM_JOB_ID}}"
max_restarts="${VLPDIST_MAX_RESTARTS:-20}"
restarts="${SLURM_RESTART_COUNT:-0}"
MASTER_ADDR="$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)"
export MASTER_ADDR
if [[ -z "${MASTER_PORT:-}" ]]; then
    # Outside the ephemeral range (read on this, the first node): no outgoing connection can hold
    # it when rank 0 binds it. Ports 20000 and up: above Ray's default worker ports.
    read -r ephemeral_low ephemeral_high < /proc/sys/net/ipv4/ip_local_port_range \
        || { ephemeral_low=32768; ephemeral_high=60999; }
    if (( ephemeral_low - 20000 >= 1000 )); then
        MASTER_PORT=$((20000 + SLURM_JOB_ID % (ephemeral_low - 20000)))
    else
        MASTER_PORT=$((ephemeral_high + 1 + SLURM_JOB_ID % (65535 - ephemeral_high)))
    fi
fi
export MASTER_PORT
export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"
# Since Slurm 22.05 srun no longer inherits --cpus-per-task from the job: pass it, or every rank
# (and its loader workers) gets one CPU.
cpus_per_task=(${SLURM_CPUS_PER_TASK:+--cpus-per-task="${SLURM_CPUS_PER_TASK}"})

echo "job ${SLURM_JOB_ID} (restart ${restarts} of at most ${max_restarts}): ${SLURM_NTASKS} ranks on ${SLURM_JOB_NUM_NODES} nodes," \
     "${SLURM_CPUS_PER_TASK:-1} CPUs each, master ${MASTER_ADDR}:${MASTER_PORT}, config ${VLPDIST_CONFIG} ${VLPDIST_OVERRIDES:-}"

finish() {  # one last line says what happened and with which exit status
    echo "vlpdist: $2; exit $1"
    exit "$1"
}

rm -f "${VLPDIST_STOP_MARKER}"  # a previous run's of this job (requeued runs keep the job id)
signalled=""
forward_signal() {
    signalled="${signalled:-$1}"
    echo "received SIG$1: asking the ranks to checkpoint and stop"
    kill -USR2 "${srun_pid}" 2>/dev/null  # srun forwards it to every task
}
trap 'forward_signal USR2' USR2
trap 'forward_signal TERM' TERM

srun --kill-on-bad-exit=1 "${cpus_per_task[@]}" bash -c \
    'RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS exec "$VLPDIST_PYTHON" launcher/train.py' &
srun_pid=$!
# A trapped signal interrupts `wait`; keep waiting until srun itself has ended.
while true; do
    wait "${srun_pid}"
    status=$?
    kill -0 "${srun_pid}" 2>/dev/null || break
done

if [[ ! -f "${VLPDIST_STOP_MARKER}" ]]; then  # no planned stop: the run finished or failed
    (( status == 0 )) && finish 0 "training finished"
    finish "${status}" "training failed with status ${status}${signalled:+ after SIG${signalled}}; not requeued"
fi
# Rank 0 wrote the marker once the checkpoint was complete on every rank (srun's status may still
# count a rank that was killed after it).
read -r stop_step stop_signal < "${VLPDIST_STOP_MARKER}"
rm -f "${VLPDIST_STOP_MARKER}"
stopped="stopped by ${stop_signal} at step ${stop_step}, checkpoint written"
# Why: a job still RUNNING was signalled on its own (USR2, preemption's grace period, a plain
# SIGTERM); one whose end Slurm has begun shows COMPLETING (or its end state), with
# Reason=TimeLimit at the time limit, and Reason=None after scancel.
job="$(scontrol show job "${SLURM_JOB_ID}")"
field() { grep -o "\b$1=[^ ]*" <<<"${job}" | head -n 1 | cut -d= -f2; }
job_state="$(field JobState)"
job_reason="$(field Reason)"
preempt_time="$(field PreemptTime)"
case "${job_state}" in
    PENDING|REQUEUED|REQUEUE_HOLD|REQUEUE_FED) finish 0 "${stopped}; Slurm requeued the job itself" ;;
    RUNNING)
        if [[ "${signalled}" != USR2 && "${stop_signal}" != SIGUSR2 && "${preempt_time:-None}" == None ]]; then
            finish "${STOPPED_NOT_REQUEUED_EXIT_CODE}" "${stopped}; a SIGTERM from neither scancel nor preemption: not requeued (resubmit to resume)"
        fi ;;
    *)
        if [[ "${job_state}" != TIMEOUT && "${job_state}" != PREEMPTED && "${job_reason}" != TimeLimit \
              && "${job_reason}" != Preempted* ]]; then
            finish 0 "${stopped}; the job was cancelled (scancel): not requeued"
        fi ;;
esac
if (( restarts >= max_restarts )); then
    finish "${STOPPED_NOT_REQUEUED_EXIT_CODE}" "${stopped}; restart cap reached (${restarts} restarts, VLPDIST_MAX_RESTARTS=${max_restarts}): not requeued (resubmit to resume)"
fi
if ! scontrol requeue "${SLURM_JOB_ID}"; then
    finish "${REQUEUE_FAILED_EXIT_CODE}" "${stopped}; scontrol requeue ${SLURM_JOB_ID} failed (resubmit to resume)"
fi
finish 0 "${stopped}; requeued job ${SLURM_JOB_ID} (restart $((restarts + 1)) of at most ${max_restarts})"
