#!/usr/bin/env bash
# Downloads the wheel sets benchmarks/gpu/run_device.sh installs on the lent GPU machine (Python 3.12, x86_64),
# one directory per set: .whl/base (ftscale: snakemake, transformers, peft; see NOTES.md), .whl/nemo (NeMo 2.7.3
# and what its import chain asks for beyond the GPU image), .whl/automodel (NeMo AutoModel 0.7.0). Run from the repo root.
# The nemo set is what was found missing so far, import by import (2026-12-01): see NOTES.md, "NeMo on the lent GPU".
set -euo pipefail
get() { set_dir=.whl/$1; shift; mkdir -p "$set_dir"; python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d "$set_dir" "$@"; }
get nemo annotated_types==0.8.0 bcrypt==5.0.0 catalogue==2.0.10 cffi==2.1.1 cryptography==50.0.2 datasets==4.8.5 decorator==5.3.1 deprecated==1.3.1 dill==0.4.1 docstring_parser==0.18.0 fabric==3.2.3 fiddle==0.3.1 graphviz==0.21 huggingface_hub==0.36.2 hydra_core==1.3.2 invoke==3.0.3 leptonai==0.0.0+stub libcst==1.9.0 lightning==2.4.0 megatron_core==0.15.3 multiprocess==0.70.19 nemo_run==0.11.1 nemo_toolkit==2.7.3 nv_one_logger_core==2.3.1 nv_one_logger_pytorch_lightning_integration==2.3.1 nv_one_logger_training_telemetry==2.3.1 nvidia_modelopt==0.37.0 omegaconf==2.3.0 overrides==7.7.0 paramiko==5.1.0 pulp==3.3.2 pydantic==2.14.4 pydantic_core==2.50.5 pynacl==1.6.2 strenum==0.5.0 tokenizers==0.22.2 toml==0.10.2 torchprofile==0.1.0 torchx==0.7.0 transformers==4.57.6 typing_inspection==0.4.5
pip wheel -q --no-deps wget==3.2 antlr4-python3-runtime==4.9.3 -w .whl/nemo   # sdist only on PyPI
get automodel datasets==5.2.0 dill==0.4.1 flashoptim==0.1.4 megatron_fsdp==0.5.0 mistral_common==1.13.1 multiprocess==0.70.19 nemo_automodel==0.7.0 quack_kernels==0.6.4 torchao==0.18.0 torchdata==0.11.0 transformers==5.18.0
du -sh .whl/*
