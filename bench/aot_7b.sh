#!/usr/bin/env bash
# AOT table for the 7B configs: compiles on this CPU machine for TPU slices; needs the
# `tpu` extra. Usage: bash bench/aot_7b.sh > aot.txt   (minutes per row on 2 cores)
set -u
cd "$(dirname "$0")/.."
export JAX_PLATFORMS=cpu
run() {  # name, config, topology, extra flags...
  local name=$1 config=$2 topology=$3; shift 3
  echo "### $name: --config=$config --topology=$topology $*"
  /usr/bin/time -f "(wall %e s, peak host RSS %M KB)" python -m owl_jax.aot --config="$config" --topology="$topology" "$@" 2>&1 \
    | grep -v -E "^(WARNING|E0000|I0000|W0000|===|Failed to find host bounds)|libtpu|Source Location|Expecting a valid"
}
# --fill: the share of the packed rows that hold data, on the length profiles of bench/packing.py
run "stage 2 LoRA, 64 packed rows x 2048, v4-8" configs/mplug_owl_llama7b.py:stage2_lora v4:2x2x1 --fill=0.94 "$@"
run "stage 2 LoRA, 64 packed rows x 2048, v5e-16" configs/mplug_owl_llama7b.py:stage2_lora v5e:4x4 --fill=0.94 "$@"
run "stage 1, 1024 packed rows x 512, v5p-128" configs/mplug_owl_llama7b.py:stage1 v5p:4x4x4 --fill=0.94 "$@"
run "stage 1, 1024 packed rows x 512, v5e-256" configs/mplug_owl_llama7b.py:stage1 v5e:16x16 --fill=0.94 "$@"
