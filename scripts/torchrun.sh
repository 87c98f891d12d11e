#!/usr/bin/env bash
# Train on one or more machines with torchrun. Run the same command on every node, with the same
# RUN name, which becomes the one run dir all processes share (each process resolves Hydra's
# ${now:...} itself, so a timestamped default would split the run).
#
#   RUN=owt-medium GPUS=8 bash scripts/torchrun.sh model=medium data=text data.path=/data/owt
#   NODES=2 NODE_RANK=0 MASTER_ADDR=node0 RUN=owt-medium bash scripts/torchrun.sh model=medium ...   # node 0
#   NODES=2 NODE_RANK=1 MASTER_ADDR=node0 RUN=owt-medium bash scripts/torchrun.sh model=medium ...   # node 1
#
# Running it again with the same RUN continues from the run's newest checkpoint.
set -euo pipefail
: "${RUN:?set RUN to a run name shared by all nodes}"
NODES="${NODES:-1}"
GPUS="${GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}"
cd "$(dirname "$0")/.."
exec torchrun \
  --nnodes="$NODES" --node_rank="${NODE_RANK:-0}" --nproc_per_node="$GPUS" \
  --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}" \
  train.py trainer.devices="$GPUS" trainer.num_nodes="$NODES" trainer.strategy=ddp \
  hydra.run.dir="runs/$RUN" "$@"
