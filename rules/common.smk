# Bookkeeping done once: the validated study, wildcard constraints, named input functions.
from ftscale.analyze.results import ResultsError, RunsNotOk, write_partial_results
from ftscale.run.configure import write_run_files, write_text
from ftscale.run.sbatch import (
    import_resources,
    render_import_sbatch,
    render_run_sbatch,
    slurm_placement,
    train_resources,
)
from ftscale.study import paths
from ftscale.study.schema import ConfigError
from ftscale.workflow import (
    container_image,
    conversion_command,
    import_command,
    job_image,
    model_files,
    run_files,
    train_command,
    workflow_study,
)


def clear_errors(call, *args, **kwargs):
    """``call(*args, **kwargs)``; ftscale's own errors name the file, so Snakemake shows their message alone."""
    try:
        return call(*args, **kwargs)
    except (ConfigError, ResultsError, RunsNotOk) as err:
        raise WorkflowError(str(err)) from None


STUDY = clear_errors(workflow_study, config, workflow.configfiles)

RUNS = {run.directory: run for run in STUDY.runs}
RUN_FILE = paths.run_file_pattern
MODEL_FILE = paths.model_file_pattern
DATA_DIR = paths.DATA_DIR_PATTERN
DATA_LOG = f"{paths.DATA_DIR_PATTERN}.log"


wildcard_constraints:
    model="|".join(STUDY.models),
    track="data_parallel|model_parallel",
    name="[A-Za-z0-9_]+",
    dataset="[A-Za-z0-9_.-]+",


def run_of(wildcards):
    return RUNS[paths.run_dir(wildcards.track, wildcards.model, wildcards.name)]


def run_params(wildcards):
    return run_of(wildcards).to_dict()


def run_sbatch(wildcards):
    return render_run_sbatch(run_of(wildcards), STUDY.config, job_image(STUDY))


def run_checkpoint(wildcards):
    """The imported model the run's engine reads: the Hugging Face checkpoint, or NeMo's conversion
    (none for a run the plan skips: it trains nothing)."""
    run = run_of(wildcards)
    return [] if run.skip_reason else run.checkpoint


def run_dataset(wildcards):
    """The prepared dataset the run reads (none for mock data, made inside the job)."""
    directory = run_of(wildcards).dataset_dir
    return [directory] if directory else []


def import_sbatch(wildcards):
    model = STUDY.models[wildcards.model]
    return render_import_sbatch(model, STUDY.config, job_image(STUDY))


def train_job(wildcards, attempt=1):
    """The scheduler resources of the run's job (they grow with each retry)."""
    return train_resources(run_of(wildcards), STUDY.config, attempt)


def train_threads(wildcards):
    return train_job(wildcards).cpus


def train_nodes(wildcards):
    return train_job(wildcards).nodes


def train_placement(name):
    """The input function of the train job's placement resource ``name`` (``slurm_placement``)."""
    return lambda wildcards: slurm_placement(train_job(wildcards))[name]


def train_mem_mb(wildcards, attempt):
    return train_job(wildcards, attempt).mem_mb


def train_runtime(wildcards, attempt):
    return train_job(wildcards, attempt).runtime_min


def import_mem_mb(wildcards, attempt):
    return import_resources(STUDY.config, attempt).mem_mb


def import_runtime(wildcards, attempt):
    return import_resources(STUDY.config, attempt).runtime_min


onerror:
    # With --keep-going, failed runs still get their rows (status and reason) in the tables.
    write_partial_results(STUDY, Path("results/scaling.csv"), Path("results/tables.md"))
