#!/usr/bin/env bash
# A CPU replica of the lent GPU machine's Python, to find what a device call would stop at (a missing
# package, a config NeMo rejects, a file it cannot read) before spending device time on it. Usage, from
# the repo root, after benchmarks/gpu/wheels.sh:
#   [SETS="base nemo automodel"] bash benchmarks/gpu/cpu_replica.sh [DIR]   # default /tmp/ftscale-replica
# (~3 min for the sets, more the first time for the venv; SETS as the call would carry them: hf only if so).
# It makes DIR/venv with the image's packages (replica-image.txt; CPU torch), installs each wheel set of
# .whl/ into its own directory as run_device.sh does (DIR/site, DIR/site-nemo, DIR/site-am; the local
# Python's builds of the same versions, or the carried wheel unpacked where only a cp312 build exists),
# writes the stand-ins (stubs.py) and the wrappers DIR/bin/python-nemo and DIR/bin/python-am. Point a
# config's nemo.python / automodel.python at them and run Snakemake here: every stage runs until the GPU.
# DIR/cpuhack/sitecustomize.py (on the wrappers' path, replica only) makes the few torch.cuda queries that
# come before real GPU work harmless, so the replica gets as far as it can; nothing it measures is a result.
# With FTSCALE_REPLICA_CPU_TRAINER=1 in the environment, NeMo's trainer is also built on the CPU (for the
# training stage: it then gets through the logger set-up to the restore of the import).
set -euo pipefail
dir=${1:-/tmp/ftscale-replica}
repo=$PWD
[ -x "$dir/venv/bin/python" ] || { python3 -m venv "$dir/venv"; "$dir/venv/bin/pip" install -q -r benchmarks/gpu/replica-image.txt; }
declare -A SITE=([base]=site [hf]=site [nemo]=site-nemo [automodel]=site-am)
for set in ${SETS:-base nemo automodel}; do
  ls .whl/$set/*.whl >/dev/null 2>&1 || continue
  for wheel in .whl/$set/*.whl; do
    spec=$(basename "$wheel" | sed -E 's/^([^-]+)-([^-]+)-.*/\1==\2/')
    one=$(mktemp -d)  # one package at a time, then merged: pip --target skips a directory that exists,
    "$dir/venv/bin/pip" install -q --no-deps --target "$one" "$spec" 2>/dev/null \
      || { python3 -m zipfile -e "$wheel" "$one"; echo "$set: $spec unpacked from the carried wheel"; }
    mkdir -p "$dir/${SITE[$set]}"; cp -r "$one"/. "$dir/${SITE[$set]}"/; rm -rf "$one"  # (namespace packages)
  done
  echo "$set: $(ls .whl/$set/*.whl | wc -l) packages in $dir/${SITE[$set]}"
done
python3 benchmarks/gpu/stubs.py "$dir/stubs"
mkdir -p "$dir/cpuhack" "$dir/bin"
cat > "$dir/cpuhack/sitecustomize.py" <<'PY'
# CPU replica only (benchmarks/gpu/cpu_replica.sh): torch.cuda queries that come before real GPU work.
import torch
for _name, _value in {"synchronize": None, "current_device": 0, "get_device_name": "cpu replica", "set_device": None,
                      "reset_peak_memory_stats": None, "empty_cache": None, "max_memory_allocated": 0,
                      "memory_allocated": 0}.items():
    setattr(torch.cuda, _name, lambda *a, _v=_value, **k: _v)
import os
if os.environ.get("FTSCALE_REPLICA_CPU_TRAINER"):  # the training stage: Lightning's "gpu" trainer on the CPU
    torch.cuda.device_count = lambda: 1
    from lightning.pytorch.trainer.connectors import accelerator_connector as _ac
    _ac._AcceleratorConnector._choose_gpu_accelerator_backend = lambda self: "cpu"
PY
for pair in nemo:site-nemo am:site-am; do
  printf '#!/bin/sh\nPYTHONPATH=%s/cpuhack:%s/%s:%s/stubs:%s/scripts:%s/site exec %s/venv/bin/python "$@"\n' \
    "$dir" "$dir" "${pair#*:}" "$dir" "$repo" "$dir" "$dir" > "$dir/bin/python-${pair%%:*}"
done
chmod +x "$dir/bin/"*
echo "replica ready: $dir/bin/python-nemo, $dir/bin/python-am"
