"""Every file of the workflow, in one place.

Paths of runs and models are relative to the workflow's root directory (where Snakemake runs:
the repository root), which every function that touches them takes as ``root``. The code's own
files (schemas, the shipped corpus) are found from the package: ``CODE_ROOT``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ftscale.engines import engine, names

#: The checkout the package is installed from (``pip install -e .``): schemas live in its config/.
CODE_ROOT = Path(__file__).resolve().parents[3]
SCHEMAS = CODE_ROOT / "config"
CORPUS = Path(__file__).resolve().parents[1] / "data" / "corpus.txt"

EXPERIMENTS = "experiments"
MODELS = "models"
RESULTS = "results"

#: The files of one run directory, by role.
RUN_FILES = {
    "run": "run.json",            # the resolved configuration (configure_run)
    "sbatch": "run.sbatch",       # the standalone job script (configure_run)
    "configure_log": "configure.log",
    "log": "train.log",           # every rank's output
    "launch": "launch.json",      # command, host, times, exit code, signal
    "metrics": "metrics.jsonl",   # one record per step; written last, only by a finished job
    "benchmark": "benchmark.tsv",  # Snakemake's benchmark of the train job
}

#: The files of one model directory, by role.
MODEL_FILES = {
    "spec": "model.yaml",
    "checkpoint": "model",        # the imported Hugging Face checkpoint, read-only
    "import_log": "import.log",
    "import_benchmark": "import.benchmark.tsv",
    "import_sbatch": "import.sbatch",
    "render_log": "render.log",
    # and each engine's own (an engine's conversion of the checkpoint): EngineSpec.model_files
    **{role: name for spec in map(engine, names()) for role, name in spec.model_files.items()},
}

#: A prepared dataset (ftscale.run.data.prepare_dataset), one directory per dataset, read by every run
#: of every engine; NeMo's FineTuningDataModule reads exactly these two file names.
DATA_DIR_PATTERN = f"{EXPERIMENTS}/data/{{dataset}}"
DATA_FILES = {
    "training": "training.jsonl",
    "validation": "validation.jsonl",
    "info": "DATASET.json",  # what it was made from; written last
}

#: Snakemake's pattern of a run directory (wildcards track, model, name).
RUN_DIR_PATTERN = f"{EXPERIMENTS}/{{track}}/{{model}}/{{name}}"
MODEL_DIR_PATTERN = f"{MODELS}/{{model}}"


def run_dir(track: str, model: str, name: str) -> str:
    return RUN_DIR_PATTERN.format(track=track, model=model, name=name)


def data_dir(dataset: str) -> str:
    return DATA_DIR_PATTERN.format(dataset=dataset)


def run_file_pattern(role: str) -> str:
    """``experiments/{track}/{model}/{name}/<file>``, for the rules."""
    return f"{RUN_DIR_PATTERN}/{RUN_FILES[role]}"


def model_file_pattern(role: str) -> str:
    """``models/{model}/<file>``, for the rules."""
    return f"{MODEL_DIR_PATTERN}/{MODEL_FILES[role]}"


@dataclass(frozen=True)
class RunPaths:
    """The files of one run directory (``directory`` relative to the root, or absolute)."""

    directory: Path

    def __getattr__(self, role: str) -> Path:
        if role in RUN_FILES:
            return self.directory / RUN_FILES[role]
        raise AttributeError(role)


@dataclass(frozen=True)
class ModelPaths:
    """The files of one model directory."""

    directory: Path

    def __getattr__(self, role: str) -> Path:
        if role in MODEL_FILES:
            return self.directory / MODEL_FILES[role]
        raise AttributeError(role)


def model_paths(name: str, root: Path = Path(".")) -> ModelPaths:
    return ModelPaths(Path(root) / MODELS / name)
