#!/usr/bin/env bash
# Runs on the lent GPU machine (device tool), from the repository root. Usage:
#   bash benchmarks/gpu/run_device.sh [--target TARGET] [--deadline SECONDS] [--fail-fast] CONFIG [CONFIG ...]
# --deadline: the whole script's time; each Snakemake run gets what is left (less 20 s to pack the results),
# so a slow run is stopped and its logs still come back. --fail-fast: skip the configs after the first whose
# Snakemake fails (a first run of an engine: the later configs would stop at the same error). SNAKEMAKE_ARGS (environment) is passed to Snakemake,
# e.g. SNAKEMAKE_ARGS='--config engine=[nemo]' for one engine of a head-to-head config, or
# SNAKEMAKE_ARGS='--config option_sets=[bf16lora]' for one of the option sets a config lists.
# Wheels (made here by benchmarks/gpu/wheels.sh, carried as .whl/<set>/) go into one directory per set,
# so each engine gets the versions it was made for:
#   .whl/base      -> /tmp/site       ftscale's own needs (snakemake, peft, ...; the image's transformers)
#   .whl/hf        -> /tmp/site       transformers 5.23 + tokenizers, where a run needs them over the image's 5.17
#   .whl/nemo      -> /tmp/site-nemo  NeMo 2.7.3 + megatron-core; /tmp/bin/python-nemo puts it first
#   .whl/automodel -> /tmp/site-am    NeMo AutoModel 0.7.0;         /tmp/bin/python-am puts it first
# (the configs name those interpreters as nemo.python / automodel.python). A set not carried in this
# call is kept from an earlier call while the machine stays warm.
# The workflow runs in ONE work directory, /tmp/wf, kept between calls of a warm machine, so that a
# later call reuses the imports of an earlier one. Leaves results-<config>.tar.gz per config in $OUT, with the
# run directories that config's tables cite (not every run of the work directory).
set -uo pipefail
target=results/tables.md
deadline=$(( $(date +%s) + 100000 ))
fail_fast=0
while [ $# -gt 0 ]; do
  case $1 in
    --target) target=$2; shift 2 ;;
    --deadline) deadline=$(( $(date +%s) + $2 )); shift 2 ;;
    --fail-fast) fail_fast=1; shift ;;
    *) break ;;
  esac
done
repo=$PWD
declare -A SITE=([base]=/tmp/site [hf]=/tmp/site [nemo]=/tmp/site-nemo [automodel]=/tmp/site-am)
for set in base hf nemo automodel; do
  if ls .whl/$set/*.whl >/dev/null 2>&1; then
    # a warm machine keeps both the carried wheels and what an earlier call installed: install a set once
    stamp="${SITE[$set]}/.installed-$set"
    if [ "$(ls .whl/$set | md5sum)" = "$(cat "$stamp" 2>/dev/null)" ]; then echo "$set: installed already"; continue; fi
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "${SITE[$set]}" \
      .whl/$set/*.whl || { echo "wheel install failed ($set)"; exit 1; }
    ls .whl/$set | md5sum > "$stamp"
    echo "installed $(ls .whl/$set/*.whl | wc -l) wheels of $set into ${SITE[$set]}"
  fi
done
export PYTHONPATH=/tmp/site:$repo/scripts PYTHONUNBUFFERED=1
python3 benchmarks/gpu/stubs.py /tmp/site-stubs   # leptonai and pulp stand-ins for NeMo (see that file)
mkdir -p /tmp/bin
printf '#!/bin/sh\nexec python3 -m ftscale.cli "$@"\n' > /tmp/bin/ftscale
printf '#!/bin/sh\nPYTHONPATH=/tmp/site-nemo:/tmp/site-stubs:%s:/tmp/site exec python3 "$@"\n' "$repo/scripts" > /tmp/bin/python-nemo
printf '#!/bin/sh\nPYTHONPATH=/tmp/site-am:%s:/tmp/site exec python3 "$@"\n' "$repo/scripts" > /tmp/bin/python-am
chmod +x /tmp/bin/*
export PATH=/tmp/bin:/tmp/site/bin:$PATH
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
work=/tmp/wf; mkdir -p "$work"
for config in "$@"; do
  name=$(basename "$config" .yaml)
  cp -r Snakefile rules config models benchmarks "$work"/ 2>/dev/null || true
  cd "$work"
  rm -rf results   # the tables of an earlier config are not this one's
  # The versions, recorded beside the runs (it imports NeMo: with the wheel install, 54-57 s went before
  # Snakemake started on the H200, the whole of a short call's deadline).
  { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c 'import torch, transformers, peft, snakemake; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__, "peft", peft.__version__, "snakemake", snakemake.__version__)'
    [ -d /tmp/site-nemo/nemo ] && python-nemo -c 'import nemo, megatron.core, transformers; print("nemo", nemo.__version__, "megatron-core", megatron.core.__version__, "transformers", transformers.__version__)' 2>&1 | tail -1
    [ -d /tmp/site-am/nemo_automodel ] && python-am -c 'import nemo_automodel, transformers; print("nemo_automodel", nemo_automodel.__version__, "transformers", transformers.__version__)' 2>&1 | tail -1
    echo "commit ${FTSCALE_COMMIT:-unknown} (plus uncommitted changes, if any)"; date -u +%FT%TZ; } > provenance.txt 2>&1 &
  versions=$!
  start=$(date +%s)
  # one job per GPU at a time: Snakemake counts the gpu resource the train jobs declare
  left=$(( deadline - $(date +%s) - 20 ))
  # shellcheck disable=SC2086  # SNAKEMAKE_ARGS is split on purpose
  timeout --kill-after=10 "$(( left > 1 ? left : 1 ))" snakemake "$target" --cores 16 --resources gpu=$(nvidia-smi -L | wc -l) \
    --scheduler greedy --keep-going --configfile "$config" ${SNAKEMAKE_ARGS:-} > "snakemake-$name.log" 2>&1
  status=$?
  echo "snakemake exit $status after $(( $(date +%s) - start )) s ($config, $target)"
  wait "$versions"; cat provenance.txt
  grep -h "\[ftscale\]\|Error\|error" "snakemake-$name.log" | tail -20
  for log in models/*/import.log models/*/nemo-import.log; do [ -f "$log" ] && { echo "== $log"; tail -5 "$log"; }; done
  [ -f results/tables.md ] && cat results/tables.md
  for log in experiments/*/*/*/train.log; do echo "== $log"; grep -E "error=|Error|step [0-9]+ \||Training epoch|\[ftscale\] (layout|done)" "$log" | tail -6; done
  # only the run directories of this config's tables (every row, failed ones too): runs of an earlier config in the
  # same work directory (same run identity, other engine options) must not travel as this config's
  runs=$(python3 -c 'import csv, os, sys
for row in csv.DictReader(open(sys.argv[1])):
    d = os.path.join("experiments", row["track"], row["model"], row["run"])  # failed runs too (no source)
    for f in ("train.log", "launch.json", "run.json", "automodel.yaml"):
        if os.path.exists(os.path.join(d, f)): print(os.path.join(d, f))' results/scaling.csv 2>/dev/null | sort -u)
  # shellcheck disable=SC2086  # one path per word
  tar czf "$OUT/results-$name.tar.gz" provenance.txt "snakemake-$name.log" results models/*/*.log models/*/*/IMPORT.json \
    $runs 2>/dev/null
  cd "$repo"
  if [ "$fail_fast" = 1 ] && [ "$status" != 0 ]; then echo "--fail-fast: skipping the configs after $config"; break; fi
done
