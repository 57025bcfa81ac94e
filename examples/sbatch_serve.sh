#!/bin/bash
# One SLURM allocation of GPU nodes and no external endpoint: each Dask worker starts vLLM on its
# node's GPUs, sends its requests to its own server, and the servers stop with the run.
# Submit: sbatch examples/sbatch_serve.sh   (edit the model path, paths and resources first)
#SBATCH --job-name=nemocc-serve
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:TERM@180        # SIGTERM 180 s before the limit (vLLM takes a while to stop)
set -euo pipefail
source .venv/bin/activate                       # nemocc_dask and vllm, on a shared filesystem
SCHED_FILE="$PWD/scheduler-${SLURM_JOB_ID}.json"

dask scheduler --scheduler-file "$SCHED_FILE" --no-dashboard &
srun --ntasks="$SLURM_NNODES" dask worker --scheduler-file "$SCHED_FILE" \
    --nthreads 16 --nworkers 1 --no-dashboard &

# --serve-per gpu: one vLLM per GPU of the worker, CUDA_VISIBLE_DEVICES set to it ({gpu} is its
# index). For tensor parallelism over the node's GPUs use one server per node, shared by the
# node's workers:
#   --serve "vllm serve /models/llama-3.3-70b --tensor-parallel-size 8 --host {host} --port {port}" \
#   --serve-per node
# Server logs: /data/out/diverse_qa/serve-logs/. --max-in-flight auto (the default) learns each
# server's capacity from its /metrics.
nemocc-dask run --task diverse_qa --input /data/docs/ --output /data/out/diverse_qa \
    --serve "vllm serve /models/llama-3.1-8b-instruct --host {host} --port {port} --max-num-seqs 512" \
    --serve-per gpu --serve-health /health --serve-startup-timeout 1200 \
    --model /models/llama-3.1-8b-instruct --scheduler-file "$SCHED_FILE" &
DRIVER=$!
trap 'kill -TERM "$DRIVER" 2>/dev/null' TERM
while :; do status=0; wait "$DRIVER" || status=$?; kill -0 "$DRIVER" 2>/dev/null || break; done
if [ "$status" -eq 75 ]; then scontrol requeue "$SLURM_JOB_ID"; fi
exit "$status"
