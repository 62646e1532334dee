# Bookkeeping done once: the validated study, wildcard constraints, input functions.
from ftscale.analyze import write_partial_results, write_results
from ftscale.config import ConfigError, load_study, write_run_files, write_text
from ftscale.sbatch import import_resources, render_import_sbatch, render_run_sbatch, train_resources

try:
    STUDY = load_study(config, source=", ".join(map(str, workflow.configfiles)) or "config", root=Path.cwd())
except ConfigError as err:
    raise WorkflowError(str(err)) from None

RUNS = {run.directory: run for run in STUDY.runs}


wildcard_constraints:
    model="|".join(STUDY.models),
    track="data_parallel|model_parallel",
    name="[A-Za-z0-9_]+",


def run_of(wildcards):
    return RUNS[f"experiments/{wildcards.track}/{wildcards.model}/{wildcards.name}"]


def run_params(wildcards):
    return run_of(wildcards).to_dict()


def run_sbatch(wildcards):
    return render_run_sbatch(run_of(wildcards), STUDY.config, Path.cwd(), STUDY.config["container"])


def import_sbatch(wildcards):
    model = STUDY.models[wildcards.model]
    return render_import_sbatch(model, STUDY.config, Path.cwd(), STUDY.config["container"])


def container_image():
    """The NeMo jobs' image for Snakemake's own container support (--sdm apptainer), else none."""
    image = STUDY.config["container"]
    if STUDY.config["engine"] != "nemo" or image in ("", "none"):
        return None
    return image if "://" in image else f"docker://{image}"


def run_gpus(wildcards):
    return run_of(wildcards).gpus


def all_run_dirs():
    return list(RUNS)


onerror:
    # With --keep-going, failed runs still get their rows (status and reason) in the tables.
    write_partial_results(STUDY, Path("results/scaling.csv"), Path("results/tables.md"))
