#!/usr/bin/env bash
# One host, all its devices (GPUs, TPU cores, or CPU_DEVICES fake CPU devices for testing sharding).
# Usage: experiments/launch/local.sh WORKDIR [gembed train flags ...]
#   CPU_DEVICES=8 experiments/launch/local.sh workdirs/pft --gin_file=model/tiny.gin --gin_file=prefinetune.gin --gin_file=sharding/fsdp.gin
set -euo pipefail
workdir=$1; shift
export XLA_FLAGS="${CPU_DEVICES:+--xla_force_host_platform_device_count=$CPU_DEVICES} ${XLA_FLAGS:-}"
exec "${GEMBED:-gembed}" train --workdir="$workdir" "$@"
