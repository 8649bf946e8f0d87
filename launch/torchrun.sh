#!/usr/bin/env bash
# torchrun on every node, static or elastic (rdzv) rendezvous.
#   static: NNODES=2 NODE_RANK=<0|1> MASTER_ADDR=<node 0> launch/torchrun.sh RECIPE [key=value ...]
#   rdzv:   NNODES=2 RDZV_ENDPOINT=<host:port> RDZV_ID=<job id> launch/torchrun.sh RECIPE [key=value ...]
# NPROC (default: the visible GPUs) processes per node; trainer.num_nodes / trainer.devices are set to match.
# A failed process stops the other processes of its node, without restarts (--max-restarts 0, whatever
# PET_MAX_RESTARTS says); the ranks on other nodes then fail on the lost peer or after the recipe's
# parallel.timeout_s. Rerunning the command resumes from the newest checkpoint.
# Two "nodes" on one CPU machine (what the tests do):
#   NNODES=2 NODE_RANK=0 NPROC=1 MASTER_ADDR=127.0.0.1 launch/torchrun.sh recipes/tiny_cpu.yaml parallel.sp_size=2 &
#   NNODES=2 NODE_RANK=1 NPROC=1 MASTER_ADDR=127.0.0.1 launch/torchrun.sh recipes/tiny_cpu.yaml parallel.sp_size=2
set -euo pipefail
recipe=${1:?recipe}; shift
nnodes=${NNODES:-1}
nproc=${NPROC:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
if [[ -n "${RDZV_ENDPOINT:-}" ]]; then
    rdzv=(--rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "${RDZV_ID:-sla-dist}")
else
    rdzv=(--node_rank "${NODE_RANK:-0}" --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}")
fi
exec torchrun --nnodes "$nnodes" --nproc_per_node "$nproc" --max-restarts 0 "${rdzv[@]}" \
    -m sla_dist.cli train "$recipe" trainer.num_nodes="$nnodes" trainer.devices="$nproc" "$@"
