#!/bin/bash
# One SLURM allocation: a Dask scheduler, one worker per node, then the run.
# Submit: sbatch examples/sbatch_run.sh   (edit the endpoint, model, paths and resources first)
#SBATCH --job-name=nemocc
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:TERM@120        # SIGTERM to this script 120 s before the time limit
set -euo pipefail
source .venv/bin/activate                       # a venv on a shared filesystem
SCHED_FILE="$PWD/scheduler-${SLURM_JOB_ID}.json"

dask scheduler --scheduler-file "$SCHED_FILE" --no-dashboard &
srun --ntasks="$SLURM_NNODES" dask worker --scheduler-file "$SCHED_FILE" \
    --nthreads 8 --nworkers 1 --no-dashboard &
# GPU nodes (pip install "nemocc_dask[gpu]"): add "#SBATCH --gres=gpu:1" above, start the workers
# with "dask cuda worker --scheduler-file ..." instead, and add --gpu to the run below.

# The run waits for the scheduler file and the first worker (nemocc.worker-start-timeout), and
# shares --max-in-flight among the workers as they join. It runs in the background so that this
# script can pass SIGTERM on (time limit, preemption, `scancel --signal=TERM --batch`): the run
# then journals the answers in flight and exits 75, and the job is requeued; the requeued job
# resumes where it stopped (rerunning with the same --output always resumes).
nemocc-dask run --task diverse_qa --input /data/docs/ --output /data/out/diverse_qa \
    --base-url http://inference-1:8000/v1 --base-url http://inference-2:8000/v1 \
    --model meta/llama-3.3-70b-instruct --max-in-flight 512 --scheduler-file "$SCHED_FILE" &
DRIVER=$!
trap 'kill -TERM "$DRIVER" 2>/dev/null' TERM
while :; do status=0; wait "$DRIVER" || status=$?; kill -0 "$DRIVER" 2>/dev/null || break; done
if [ "$status" -eq 75 ]; then scontrol requeue "$SLURM_JOB_ID"; fi   # or RequeueExit=75 in slurm.conf
exit "$status"
