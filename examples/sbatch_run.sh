#!/bin/bash
# One SLURM allocation: a Dask scheduler, one worker per node, then the run.
# Submit: sbatch examples/sbatch_run.sh   (edit the endpoint, model, paths and resources first)
#SBATCH --job-name=nemocc
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --requeue
set -euo pipefail
source .venv/bin/activate                       # a venv on a shared filesystem
SCHED_FILE="$PWD/scheduler-${SLURM_JOB_ID}.json"

dask scheduler --scheduler-file "$SCHED_FILE" --no-dashboard &
srun --ntasks="$SLURM_NNODES" dask worker --scheduler-file "$SCHED_FILE" \
    --nthreads 8 --nworkers 1 --no-dashboard &
# GPU nodes (pip install "nemocc_dask[gpu]"): add "#SBATCH --gres=gpu:1" above, start the workers
# with "dask cuda worker --scheduler-file ..." instead, and add --gpu to the run below.
sleep 20

# Rerunning with the same --output resumes (requeued jobs included).
nemocc-dask run --task diverse_qa --input /data/docs/ --output /data/out/diverse_qa \
    --base-url http://inference-1:8000/v1 --base-url http://inference-2:8000/v1 \
    --model meta/llama-3.3-70b-instruct --max-in-flight 512 --scheduler-file "$SCHED_FILE"
