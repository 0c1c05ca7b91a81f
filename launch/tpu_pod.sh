#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (single- or multi-host): optionally create it, put this code on every
# worker, install it with the `tpu` extra, and run `python -m owl_jax.train` on all workers at once.
# JAX's runtime does the rest: owl_jax/distributed.py sees a multi-host slice and calls
# jax.distributed.initialize(), which reads the workers and ranks from the TPU VM metadata.
#
#   launch/tpu_pod.sh --tpu=NAME --zone=ZONE --accelerator-type=TYPE --config=CONFIG --workdir=gs://... \
#       [options] [-- extra `python -m owl_jax.train` args]
#
#   launch/tpu_pod.sh --tpu=owl-v5e-16 --zone=us-west4-a --accelerator-type=v5litepod-16 \
#       --config=configs/mplug_owl_llama7b.py:stage2_lora --workdir=gs://my-bucket/owl/stage2 --create --spot \
#       -- --config.init.params_dir=gs://my-bucket/owl/stage1/params
#
# Required: --tpu, --zone, --accelerator-type, --config, --workdir.
# Options:
#   --project=P             gcloud project (default: gcloud's configured one)
#   --create                create the TPU VM first (gcloud compute tpus tpu-vm create)
#   --runtime-version=V     TPU VM image for --create (default: chosen from the accelerator type:
#                           v5litepod -> v2-alpha-tpuv5-lite, v5p -> v2-alpha-tpuv5,
#                           v6e -> v2-alpha-tpuv6e, else tpu-ubuntu2204-base)
#   --spot | --preemptible  capacity type for --create
#   --code=copy|git         copy: this working tree (git-tracked + untracked, not ignored files), as a
#                           tarball scp'd to every worker (default); git: clone --repo at --ref there
#   --repo=URL --ref=REV    for --code=git (default ref: main)
#   --skip-setup            neither copy nor install (code and venv from an earlier launch are there);
#                           what a resume after preemption uses
#   --log-dir=URI           every worker's output is copied there at the end as <hostname>.log
#                           (default: WORKDIR/logs); during the run it is in ~/owl_train.log on each worker
#   --detach                start training in the background on every worker (nohup) and return
#   --env=K=V               extra environment for the training processes (repeatable)
#   --python-version=V      Python of the workers' venv (default 3.11; uv fetches it if the image lacks it)
#   --pip-extra="PKGS"      installed next to the package (default "gcsfs tensorboardX": gs:// file access
#                           for etils.epath/orbax metadata, and the TensorBoard writer)
#   --dry-run               print every command (one per line, shell-quoted) and run nothing
#
# Workdir: use gs:// for a multi-host slice. Orbax writes checkpoints there from every worker
# (tensorstore's GCS driver), process 0 writes metrics.jsonl and tensorboard/ (staged locally, synced
# every minute and at exit), and the params export lands in WORKDIR/params. After a preemption, rerun
# the same command (add --create if the spot/preemptible VM was deleted; --skip-setup if the VM and
# its venv survived): training resumes from the latest checkpoint in WORKDIR.
set -euo pipefail

tpu="" zone="" accel="" config="" workdir="" project="" create=0 runtime="" capacity=""
code="copy" repo="" ref="main" python_version="3.11" skip_setup=0 log_dir="" detach=0 dry_run=0 pip_extra="gcsfs tensorboardX"
envs=()
train_args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu=*) tpu="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --accelerator-type=*) accel="${1#*=}" ;;
    --config=*) config="${1#*=}" ;;
    --workdir=*) workdir="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --create) create=1 ;;
    --runtime-version=*) runtime="${1#*=}" ;;
    --spot) capacity="--spot" ;;
    --preemptible) capacity="--preemptible" ;;
    --code=*) code="${1#*=}" ;;
    --repo=*) repo="${1#*=}" ;;
    --ref=*) ref="${1#*=}" ;;
    --skip-setup) skip_setup=1 ;;
    --log-dir=*) log_dir="${1#*=}" ;;
    --detach) detach=1 ;;
    --env=*) envs+=("${1#*=}") ;;
    --pip-extra=*) pip_extra="${1#*=}" ;;
    --python-version=*) python_version="${1#*=}" ;;
    --dry-run) dry_run=1 ;;
    -h|--help) sed -n '2,40p' "$0"; exit 0 ;;
    --) shift; train_args=("$@"); break ;;
    *) echo "tpu_pod.sh: unknown argument $1 (train args go after --)" >&2; exit 2 ;;
  esac
  shift
done
missing=()
for v in tpu zone accel config workdir; do
  [[ -n "${!v}" ]] || missing+=("$v")
done
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "tpu_pod.sh: missing ${missing[*]} (need --tpu --zone --accelerator-type --config --workdir; --help)" >&2
  exit 2
fi
if [[ "$code" != copy && "$code" != git ]]; then
  echo "tpu_pod.sh: --code must be copy or git" >&2; exit 2
fi
if [[ "$code" == git && -z "$repo" && "$skip_setup" == 0 ]]; then
  echo "tpu_pod.sh: --code=git needs --repo=URL" >&2; exit 2
fi
if [[ "$workdir" != gs://* ]]; then
  echo "tpu_pod.sh: warning: --workdir=$workdir is not on gs://; on a multi-host slice every worker would write its own local copy" >&2
fi
log_dir="${log_dir:-${workdir%/}/logs}"
if [[ -z "$runtime" ]]; then
  case "$accel" in
    v5litepod-*|v5e-*) runtime="v2-alpha-tpuv5-lite" ;;
    v5p-*) runtime="v2-alpha-tpuv5" ;;
    v6e-*) runtime="v2-alpha-tpuv6e" ;;
    *) runtime="tpu-ubuntu2204-base" ;;
  esac
fi

REMOTE_DIR='$HOME/owl_jax'   # expanded by the workers' shell
VENV='$HOME/owl_venv'
UV='$HOME/.local/bin/uv'
TARBALL="/tmp/owl_jax_src_${tpu}.tgz"

# -- helpers ------------------------------------------------------------------------------------
quote() {  # one shell word, quoted only when needed (dry-run output stays readable and parseable)
  local a="$1"
  if [[ "$a" =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then
    printf '%s' "$a"
  else
    printf "'%s'" "${a//\'/\'\\\'\'}"
  fi
}
show() {
  local out="" a
  for a in "$@"; do out+="$(quote "$a") "; done
  printf '%s\n' "${out% }"
}
run() {  # run a command, or print it under --dry-run
  if [[ "$dry_run" == 1 ]]; then show "$@"; else echo "+ $(show "$@")" >&2; "$@"; fi
}
gflags=(--zone="$zone")
[[ -n "$project" ]] && gflags+=(--project="$project")
on_all_workers() {  # $1: the command every worker's shell runs
  run gcloud compute tpus tpu-vm ssh "$tpu" "${gflags[@]}" --worker=all --command="$1"
}

# -- 1. the TPU VM ------------------------------------------------------------------------------
if [[ "$create" == 1 ]]; then
  create_cmd=(gcloud compute tpus tpu-vm create "$tpu" "${gflags[@]}" --accelerator-type="$accel" --version="$runtime")
  [[ -n "$capacity" ]] && create_cmd+=("$capacity")
  run "${create_cmd[@]}"
fi

# -- 2. code and install ------------------------------------------------------------------------
if [[ "$skip_setup" == 0 ]]; then
  if [[ "$code" == copy ]]; then
    root="$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"
    if [[ "$dry_run" == 1 ]]; then
      show bash -c "cd $(quote "$root") && git ls-files -z --cached --others --exclude-standard | tar --null -czf $(quote "$TARBALL") -T -"
    else
      (cd "$root" && git ls-files -z --cached --others --exclude-standard | tar --null -czf "$TARBALL" -T -)
    fi
    run gcloud compute tpus tpu-vm scp "$TARBALL" "$tpu:owl_jax_src.tgz" "${gflags[@]}" --worker=all
    on_all_workers "rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar -xzf ~/owl_jax_src.tgz -C $REMOTE_DIR"
  else
    on_all_workers "rm -rf $REMOTE_DIR && git clone $(printf '%q' "$repo") $REMOTE_DIR && git -C $REMOTE_DIR checkout $(printf '%q' "$ref")"
  fi
  # uv brings the Python the package needs (>= 3.11; TPU VM images ship 3.10) without python3-venv.
  on_all_workers "python3 -m pip install -q --user -U uv && rm -rf $VENV && $UV venv -q --python $python_version $VENV && $UV pip install -q --python $VENV/bin/python -e \"$REMOTE_DIR[tpu]\" $pip_extra"
fi

# -- 3. train on every worker at once ------------------------------------------------------------
train="cd $REMOTE_DIR && env"
for e in "${envs[@]}"; do train+=" $(printf '%q' "$e")"; done
train+=" $VENV/bin/python -m owl_jax.train $(printf '%q' "--config=$config") $(printf '%q' "--workdir=$workdir")"
for a in "${train_args[@]}"; do train+=" $(printf '%q' "$a")"; done
if [[ "$log_dir" == *://* ]]; then
  upload="gcloud storage cp -q ~/owl_train.log $(printf '%q' "${log_dir%/}")/\$(hostname).log"
else
  upload="mkdir -p $(printf '%q' "$log_dir") && cp ~/owl_train.log $(printf '%q' "${log_dir%/}")/\$(hostname).log"
fi
if [[ "$detach" == 1 ]]; then
  job="($train) > ~/owl_train.log 2>&1; rc=\$?; $upload || echo 'log upload failed' >&2; exit \$rc"
  on_all_workers "nohup bash -c $(printf '%q' "$job") > /dev/null 2>&1 < /dev/null & echo \"training started on \$(hostname), log: ~/owl_train.log\""
else
  on_all_workers "($train) 2>&1 | tee ~/owl_train.log; rc=\${PIPESTATUS[0]}; $upload || echo 'log upload failed' >&2; exit \$rc"
fi
