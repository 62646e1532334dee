#!/usr/bin/env bash
# Runs on the lent GPU machine (device tool), from the repository root, with the project's wheels in
# .whl (see benchmarks/gpu/NOTES.md for how they are made). Usage:
#   bash benchmarks/gpu/run_device.sh CONFIG [CONFIG ...]
# Runs the workflow itself (snakemake ... results/tables.md) once per config, each in its own copy of
# the workflow, and leaves one results-<name>.tar.gz per config in $OUT (tables, CSV, logs, provenance).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD/scripts PYTHONUNBUFFERED=1
mkdir -p /tmp/bin
printf '#!/bin/sh\nexec python3 -m ftscale.cli "$@"\n' > /tmp/bin/ftscale && chmod +x /tmp/bin/ftscale
export PATH=/tmp/bin:/tmp/site/bin:$PATH
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
repo=$PWD
for config in "$@"; do
  name=$(basename "$config" .yaml)
  work=/tmp/wf-$name; rm -rf "$work"; mkdir -p "$work"
  cp -r Snakefile rules config models benchmarks "$work"/
  cd "$work"
  { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c 'import torch, transformers, peft, snakemake; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__, "peft", peft.__version__, "snakemake", snakemake.__version__)'
    echo "commit ${FTSCALE_COMMIT:-unknown} (plus uncommitted changes, if any)"; date -u +%FT%TZ; } > provenance.txt 2>&1
  cat provenance.txt
  start=$(date +%s)
  # one job per GPU at a time: Snakemake counts the gpu resource the train jobs declare
  snakemake results/tables.md --cores 16 --resources gpu=$(nvidia-smi -L | wc -l) --scheduler greedy --keep-going --configfile "$config" > snakemake.log 2>&1
  echo "snakemake exit $? after $(( $(date +%s) - start )) s ($config)"
  grep -h "\[ftscale\]" snakemake.log | tail -20
  cat results/tables.md
  tar czf "$OUT/results-$name.tar.gz" provenance.txt snakemake.log results experiments/*/*/*/{train.log,launch.json,run.json} 2>/dev/null
  cd "$repo"
done
