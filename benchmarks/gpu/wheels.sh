#!/usr/bin/env bash
# Downloads the wheel sets benchmarks/gpu/run_device.sh installs on the lent GPU machine (Python 3.12, x86_64),
# one directory per set, each only what the machine's image lacks (device KINDS.md lists the image):
#   .whl/base       ftscale's own needs: snakemake and its dependencies, peft, tabulate, ... (image's transformers 5.17),
#                   and liger-kernel 0.8.5 (the [gpu] extra: pure Python, 0.9 MB; needs torch and triton, in the image)
#   .whl/hf         transformers 5.23 + tokenizers + huggingface_hub 2.x, for runs measured with them (older rows of docs/journal/gpu-sessions.md)
#   .whl/nemo       NeMo 2.7.3 and what its import chain and llm.finetune ask for, found import by import
#                   (docs/journal/gpu-sessions.md, "NeMo 2.7.3 on the lent H200"); pydantic comes from base, leptonai and pulp from stubs.py
#   .whl/automodel  NeMo AutoModel 0.7.0
# A call carries at most 64 MiB: base + nemo (53 MiB) together, automodel (27 MiB) in a later call of a warm machine.
# Run from the repo root.
set -euo pipefail
get() { set_dir=.whl/$1; shift; mkdir -p "$set_dir"; python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_39_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  --platform any -d "$set_dir" "$@"; }
get base accelerate==1.15.0 annotated_doc==0.0.7 annotated_types==0.8.0 anyio==4.16.0 argparse_dataclass==2.0.0 attrs==26.1.0 \
  certifi==2026.10.19.post1 charset_normalizer==3.5.3 click==8.5.1 conda_inject==1.3.2 configargparse==1.9.0 docutils==0.22.4 dpath==2.2.0 \
  fastjsonschema==2.22.3 gitdb==4.0.12 gitpython==3.2.1 greenlet==3.5.6 h11==0.16.0 httpcore2==2.16.2 httpx2==2.16.2 humanfriendly==10.0 \
  idna==3.20 immutables==0.21 jsonschema==4.26.0 jsonschema_specifications==2025.9.1 jupyter_core==5.9.1 markdown_it_py==4.3.0 mdurl==0.1.2 \
  nbformat==5.11.1 packaging==25.0 peft==0.21.2 platformdirs==4.14.9 psutil==7.2.2 pydantic==2.14.4 pydantic_core==2.50.5 pygments==2.21.0 \
  pyyaml==6.0.4 referencing==0.37.0 regex==2026.11.19 requests==2.34.2 rich==15.0.0 rpds_py==2026.9.1 safetensors==0.8.0 shellingham==1.5.4 \
  smart_open==7.7.1 smmap==5.0.3 snakemake==9.27.1 snakemake_interface_common==1.23.0 snakemake_interface_executor_plugins==9.4.0 \
  snakemake_interface_logger_plugins==2.1.0 snakemake_interface_report_plugins==1.3.0 snakemake_interface_scheduler_plugins==2.0.2 \
  snakemake_interface_storage_plugins==4.4.1 sqlalchemy==2.0.58 sqlmodel==0.0.37 tabulate==0.10.0 tenacity==9.2.1 throttler==1.2.3 \
  tqdm==4.70.1 traitlets==5.16.1 truststore==0.10.5 typer==0.29.2 typing_extensions==4.16.0 typing_inspection==0.4.5 urllib3==2.8.0 \
  wrapt==2.5.2 yte==1.9.4 liger_kernel==0.8.5
pip wheel -q --no-deps connection_pool==0.0.3 -w .whl/base   # sdist only on PyPI
get hf transformers==5.23.0 tokenizers==0.23.3 huggingface_hub==2.4.0
get nemo bcrypt==5.0.0 catalogue==2.0.10 cffi==2.1.1 cryptography==50.0.2 datasets==4.8.5 decorator==5.3.1 defusedxml==0.7.1 deprecated==1.3.1 \
  dill==0.4.1 docstring_parser==0.18.0 fabric==3.2.3 fiddle==0.3.1 graphviz==0.21 huggingface_hub==0.36.2 hydra_core==1.3.2 \
  importlib_metadata==8.7.0 invoke==3.0.3 libcst==1.9.0 lightning==2.4.0 megatron_core==0.15.3 multiprocess==0.70.19 nemo_run==0.11.1 \
  nemo_toolkit==2.7.3 nv_one_logger_core==2.3.1 nv_one_logger_pytorch_lightning_integration==2.3.1 nv_one_logger_training_telemetry==2.3.1 \
  nvidia_modelopt==0.37.0 nvidia_resiliency_ext==0.7.0 omegaconf==2.3.0 overrides==7.7.0 paramiko==5.1.0 pynacl==1.6.2 strenum==0.5.0 \
  tokenizers==0.22.2 toml==0.10.2 torchprofile==0.1.0 torchx==0.7.0 transformers==4.57.6
pip wheel -q --no-deps wget==3.2 antlr4-python3-runtime==4.9.3 -w .whl/nemo   # sdist only on PyPI
get automodel datasets==5.2.0 dill==0.4.1 flashoptim==0.1.4 megatron_fsdp==0.5.0 mistral_common==1.13.1 multiprocess==0.70.19 nemo_automodel==0.7.0 quack_kernels==0.6.4 torchao==0.18.0 torchdata==0.11.0 transformers==5.18.0
du -sh .whl/*
