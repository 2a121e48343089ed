#!/bin/bash
# One experiment on several SLURM nodes: `sbatch scripts/slurm_train.sh -S dataset=cub200 -S ...`
# (any `dvc exp run` arguments). Each node runs the same `dvc exp run` in its own checkout, with its
# node rank; every training stage then starts torchrun with the nodes' GPUs and meets the other
# nodes at node 0 (runtime.rdzv_endpoint). Each node's local rank 0 writes the same outputs, so
# every checkout ends with the whole, identical experiment; push it from node 0.
#
# Written for, not run on, a SLURM cluster: kdlib's tests run two torchrun "machines" on loopback
# (tests/test_distributed.py), not SLURM. Adjust the #SBATCH lines and the paths to your site.
#SBATCH --job-name=kdlib
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # one `dvc exp run` per node; torchrun starts one process per GPU
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --output=kdlib-%j.out
set -euo pipefail

REPO=${KDLIB_REPO:-$SLURM_SUBMIT_DIR}        # the git repository (with its DVC remote configured)
SCRATCH=${KDLIB_SCRATCH:-/tmp/kdlib-$SLURM_JOB_ID}
MASTER=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${KDLIB_RDZV_PORT:-29500}
GPUS=${SLURM_GPUS_ON_NODE:-8}

# The per-node part runs once on every node (srun: one task each). Every node starts from the same
# commit and the same DVC cache contents (dvc pull), so each reaches the same stages: a node that found
# a stage in its run cache would skip it while the others wait for it at the rendezvous.
srun --kill-on-bad-exit=1 bash -c '
  set -euo pipefail
  git clone -q "'"$REPO"'" "'"$SCRATCH"'" && cd "'"$SCRATCH"'"
  git checkout -q "'"$(git -C "$REPO" rev-parse HEAD)"'"
  python -m venv .venv && .venv/bin/pip install -q -r requirements.txt && .venv/bin/pip install -q -e .
  export PATH=$PWD/.venv/bin:$PATH
  dvc pull -q || true                   # data and upstream outputs from the remote, when it has them
  dvc exp run \
    -S runtime.nnodes='"$SLURM_NNODES"' -S runtime.node_rank=$SLURM_NODEID \
    -S runtime.nproc_per_node='"$GPUS"' -S runtime.rdzv_endpoint='"$MASTER:$PORT"' \
    -S runtime.rdzv_timeout_s=1800 '"$*"'
  if [ "$SLURM_NODEID" = 0 ]; then dvc exp push --rev HEAD origin; fi   # experiments of this commit, with their cache
'
