#!/usr/bin/env bash
# Multi-node training with the DeepSpeed launcher (pdsh/ssh to every host of the hostfile).
#   launch/deepspeed_multinode.sh HOSTFILE RECIPE [key=value ...]
# e.g. two nodes of 8 GPUs:
#   launch/deepspeed_multinode.sh launch/hostfile.example recipes/wan1.3b_sla_finetune.yaml trainer.num_nodes=2
# The recipe's trainer.devices x trainer.num_nodes must equal the slots of the hostfile. MASTER_ADDR defaults to the
# first host. Lightning reads the rank variables DeepSpeed's launcher sets.
# A failed process stops the other processes of its node (DeepSpeed's per-node launcher does so); the ranks on other
# nodes then fail on the lost peer or after the recipe's parallel.timeout_s.
set -euo pipefail
hostfile=${1:?hostfile}; recipe=${2:?recipe}; shift 2
master=${MASTER_ADDR:-$(grep -v '^#' "$hostfile" | awk 'NF {print $1; exit}')}
exec deepspeed --hostfile "$hostfile" --master_addr "$master" --master_port "${MASTER_PORT:-29500}" \
    --module sla_dist.cli train "$recipe" "$@"
