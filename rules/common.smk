# Bookkeeping done once: the validated study, wildcard constraints, named input functions.
from ftscale.analyze.results import ResultsError, not_ok_message, write_partial_results, write_results
from ftscale.estimate.plan import with_predicted_oom_skipped
from ftscale.run.configure import write_run_files, write_text
from ftscale.run.data import prepare_dataset_logged
from ftscale.run.sbatch import import_resources, render_import_sbatch, render_run_sbatch, train_resources
from ftscale.study import paths
from ftscale.study.schema import ConfigError
from ftscale.study.sweep import load_study

try:
    # With plan.skip_predicted_oom, runs the plan predicts out of memory are marked to be skipped.
    CONFIG_SOURCE = ", ".join(map(str, workflow.configfiles)) or "config"
    STUDY = with_predicted_oom_skipped(load_study(config, source=CONFIG_SOURCE))
except ConfigError as err:
    raise WorkflowError(str(err)) from None

RUNS = {run.directory: run for run in STUDY.runs}
RUN_FILE = paths.run_file_pattern
MODEL_FILE = paths.model_file_pattern
DATA_DIR = paths.DATA_DIR_PATTERN
DATA_LOG = paths.DATA_DIR_PATTERN + ".log"


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
    return render_run_sbatch(run_of(wildcards), STUDY.config, Path.cwd(), STUDY.config["container"])


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
    return render_import_sbatch(model, STUDY.config, Path.cwd(), STUDY.config["container"])


def nemo_ftscale_command():
    """ftscale under the nemo engine's own Python when the config names one (nemo.python)."""
    python = STUDY.config["nemo"].get("python")
    return f"{python} -m ftscale.cli" if python else "ftscale"


def container_image():
    """The NeMo jobs' image for Snakemake's own container support (--sdm apptainer), else none."""
    image = STUDY.config["container"]
    if set(STUDY.engines) <= {"embedded"} or image in ("", "none"):
        return None
    return image if "://" in image else f"docker://{image}"


def train_job(wildcards, attempt=1):
    """The scheduler resources of the run's job (they grow with each retry)."""
    return train_resources(run_of(wildcards), STUDY.config, attempt)


def train_threads(wildcards):
    return train_job(wildcards).cpus


def train_gpus(wildcards):
    return train_job(wildcards).gpus


def train_nodes(wildcards):
    return train_job(wildcards).nodes


def train_mem_mb(wildcards, attempt):
    return train_job(wildcards, attempt).mem_mb


def train_runtime(wildcards, attempt):
    return train_job(wildcards, attempt).runtime_min


def import_mem_mb(wildcards, attempt):
    return import_resources(STUDY.config, attempt).mem_mb


def import_runtime(wildcards, attempt):
    return import_resources(STUDY.config, attempt).runtime_min


def run_files(role, track=None):
    """One file of every planned run (of one track, when given)."""
    return [f"{d}/{paths.RUN_FILES[role]}" for d, run in RUNS.items() if track in (None, run.track)]


def write_tables(study, csv, md, plots_dir, log):
    """The tables; then a job failure when a run is not ok, so that the workflow ends non-zero (onerror
    rewrites them, marked partial)."""
    try:
        records = write_results(study, csv, md, plots_dir=plots_dir, log=log)
    except ResultsError as err:
        raise WorkflowError(str(err)) from None
    if message := not_ok_message(records, md):
        raise WorkflowError(message)


def model_files(role):
    return [MODEL_FILE(role).format(model=m) for m in STUDY.models]


onerror:
    # With --keep-going, failed runs still get their rows (status and reason) in the tables.
    write_partial_results(STUDY, Path("results/scaling.csv"), Path("results/tables.md"))
