"""What the Snakefile and rules/*.smk ask of ftscale besides each stage's entry point, so that the rules
only declare: the study as the workflow loads it, the container and command of its jobs, and the files of
every run and model. Plain Python, tested without Snakemake.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from ftscale.engines import engine
from ftscale.estimate.plan import with_predicted_oom_skipped
from ftscale.run.command import ftscale_cli
from ftscale.study import paths
from ftscale.study.sweep import Study, load_config_file, load_study

#: The configuration the Snakefile reads when no --configfile is given.
DEFAULT_CONFIGFILE = Path("config/config.yaml")


def relative_configfiles(configfiles: Iterable[str | Path], root: Path | None = None) -> list[str]:
    """Snakemake's ``workflow.configfiles`` (absolute for --configfile) relative to ``root`` (default: the
    current directory) when inside it, so that nothing written or compared depends on where the study lies."""
    root = (root or Path.cwd()).resolve()
    return [str(Path(f).relative_to(root)) if Path(f).is_absolute() and Path(f).is_relative_to(root) else str(f)
            for f in configfiles]


def config_source(configfiles: Iterable[str | Path], root: Path | None = None) -> str:
    """The config file(s) as error messages and the plan name them (``relative_configfiles``)."""
    return ", ".join(relative_configfiles(configfiles, root)) or "config"


def plan_inputs(study: Study) -> str:
    """What results/plan.md is made of besides the model files: the configuration (defaults filled) and the
    file(s) it came from, as one text; a params of the plan rule, so that another configuration remakes it."""
    return json.dumps({"source": study.source, "config": study.config}, sort_keys=True, default=str)


def workflow_study(config: dict, configfiles: Iterable[str | Path], root: Path = Path(".")) -> Study:
    """The validated study of Snakemake's ``config``; with ``plan.skip_predicted_oom``, the runs the plan
    predicts out of memory are marked to be skipped (they keep their row)."""
    return with_predicted_oom_skipped(load_study(config, source=config_source(configfiles), root=root))


def merged_config(base: dict, update: dict) -> dict:
    """Snakemake's update_config: nested mappings merged key by key, anything else replaced."""
    out = dict(base)
    for key, value in update.items():
        nested = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merged_config(out[key], value) if nested else value
    return out


def study_of_files(configfiles: Iterable[Path], root: Path = Path(".")) -> Study:
    """The study that ``snakemake --configfile FILE ...`` runs: each file read (file and line of a YAML error),
    merged in order as Snakemake merges them, then ``workflow_study``."""
    config: dict = {}
    files = list(configfiles)
    for path in files:
        config = merged_config(config, load_config_file(path))
    return workflow_study(config, files, root=root)


def job_image(study: Study) -> str:
    """The configured image of the jobs where an engine of the study needs one, else ""; ``container: none``
    means the engines are installed on the nodes. The rendered sbatch scripts (pyxis) name it as configured."""
    image = study.config["container"]
    if not any(engine(name).needs_container for name in study.engines) or image in ("", "none"):
        return ""
    return image


def container_image(study: Study) -> str | None:
    """The jobs' image for Snakemake's own container support (--sdm apptainer), or None. Snakemake runs the
    job with the working directory as its home (``apptainer exec --home $PWD``): the project is inside at
    its own path, which is the working directory there too."""
    image = job_image(study)
    if not image:
        return None
    return image if "://" in image else f"docker://{image}"


def _literal(shell: str) -> str:
    """``shell`` inside a rule's shell command, which Snakemake formats: its braces doubled."""
    return shell.replace("{", "{{").replace("}", "}}")


def train_command(study: Study) -> str:
    """The train rule's shell command (``ftscale.run.command``: the project's sources inside a container)."""
    cli = _literal(ftscale_cli(bool(job_image(study))))
    return f"{cli} train {{input.run}} --cpus {{threads}} --log {{log.train}} --launch-record {{log.launch}}"


def import_command(study: Study) -> str:
    """The import rule's shell command, output and error into its log."""
    cli = _literal(ftscale_cli(bool(job_image(study))))
    return f"{cli} import {{wildcards.model}} --out {{output}} > {{log}} 2>&1"


def converting_engines(study: Study) -> dict[str, str]:
    """The model-file roles the study's engines convert the import into, with their engine's name."""
    return {role: name for name in study.engines for role in (engine(name).checkpoint_role,)
            if role != "checkpoint"}


def conversion_command(study: Study, role: str) -> str:
    """The shell command of the rule that makes ``role`` (an engine's conversion of the import); a command that
    fails saying so when no engine of the study makes it (the rule is then never asked for)."""
    name = converting_engines(study).get(role)
    if name is None:
        return f"echo 'no engine of this study converts checkpoints into {role}' >&2; exit 1"
    section = study.engine_section(name)
    spec = engine(name)
    return spec.conversion_command(section, _literal(ftscale_cli(bool(job_image(study)), spec.python(section))))


def run_files(study: Study, role: str, track: str | None = None) -> list[str]:
    """One file (``paths.RUN_FILES[role]``) of every planned run, or of the runs of one track."""
    return [f"{run.directory}/{paths.RUN_FILES[role]}" for run in study.runs if track in (None, run.track)]


def model_files(study: Study, role: str) -> list[str]:
    """One file (``paths.MODEL_FILES[role]``) of every model of the study."""
    return [paths.model_file_pattern(role).format(model=m) for m in study.models]
