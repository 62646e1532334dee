"""Jobs inside a container image that does not have ftscale (NVIDIA's NeMo image): the rendered pyxis step
and the rules' commands as text, and a real import and training job inside a container.

The container runtime is bubblewrap (Debian's ``bubblewrap``, installed by .ci/slurm/install). It plays
pyxis: a stand-in ``srun`` on the batch script's PATH runs the step's command inside the image with the
step's own ``--container-mounts`` and ``--container-workdir`` (expanded by the script's shell), nothing
else of the host. The image is this machine's system, read-only (/usr,
/bin, /lib*, /etc and the Python installation with torch, transformers and peft) with ftscale taken out:
every top-level file and folder of its installed distribution (an editable install's .pth and finder, its
metadata, the ``ftscale`` script) is masked. No checkout, no /work and no home are inside: only the
declared mounts bring the study in, so a job that does not mount the project where its script looks for it,
or that needs ftscale installed, fails here as it would under pyxis.
"""

from __future__ import annotations

import importlib.metadata
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace as NS

import pytest
import yaml
from leftovers import MARK
from paths import REPO, TESTS
from workflow import copy_workflow

from ftscale.analyze.parse import parse_run
from ftscale.run.command import PROJECT_PYTHONPATH
from ftscale.run.configure import write_run_files, write_text
from ftscale.run.sbatch import render_import_sbatch, render_run_sbatch
from ftscale.study.sweep import load_config_file
from ftscale.workflow import container_image, import_command, job_image, train_command, workflow_study

IMAGE = "nvcr.io/nvidia/nemo:25.09"


def srun_step(script: str) -> tuple[dict[str, str], list[str]]:
    """The options and the command of the batch script's ``srun`` step (words as its shell splits them, the
    variables left unexpanded)."""
    line = next(line for line in script.splitlines() if line.startswith("srun "))
    words = shlex.split(line)[1:]
    options = {}
    while words and words[0].startswith("--"):
        key, _, value = words.pop(0).removeprefix("--").partition("=")
        options[key] = value
    return options, words


def default_study(root: Path):
    return workflow_study(load_config_file(root / "config" / "config.yaml"), ["config/config.yaml"], root=root)


def one_process_run(study):
    return next(r for r in study.runs if r.track == "data_parallel" and r.model == "tiny_llama" and r.gpus == 1)


# --- the text: pyxis lines and the rules' commands ------------------------------------------------------------

def test_pyxis_mounts_the_project_at_its_own_path_and_runs_its_sources():
    study = default_study(REPO)
    run = one_process_run(study)
    text = render_run_sbatch(run, study.config, IMAGE)
    options, command = srun_step(text)
    assert options == {"ntasks": "1", "container-image": IMAGE, "container-mounts": "$PWD:$PWD",
                       "container-workdir": "$PWD"}
    assert command == ["python3", "-m", "ftscale.cli", "train", f"{run.directory}/run.json", "--log",
                       f"{run.directory}/train.log", "--launch-record", f"{run.directory}/launch.json"]
    assert f"export {PROJECT_PYTHONPATH}" in text.splitlines()
    assert not [line for line in text.splitlines() if "container" in line and line.startswith("#SBATCH")]
    model = render_import_sbatch(study.models["tiny_llama"], study.config, IMAGE)
    assert srun_step(model)[1][:5] == ["python3", "-m", "ftscale.cli", "import", "tiny_llama"]


def test_without_a_container_the_jobs_run_the_installed_ftscale():
    study = default_study(REPO)
    text = render_run_sbatch(one_process_run(study), study.config, job_image(study))
    assert "srun" not in text and "container" not in text
    assert [line for line in text.splitlines() if line.startswith("ftscale train ")]
    assert container_image(study) is None
    assert train_command(study) == (
        "ftscale train {input.run} --cpus {threads} --log {log.train} --launch-record {log.launch}")
    assert import_command(study) == "ftscale import {wildcards.model} --out {output} > {log} 2>&1"


@pytest.mark.parametrize("container, image", [(IMAGE, IMAGE), ("none", "")])
def test_the_rules_run_the_projects_sources_inside_the_image(container, image):
    cfg = yaml.safe_load((REPO / "config" / "workshop.yaml").read_text())
    cfg["container"] = container
    study = workflow_study(cfg, ["config/workshop.yaml"], root=REPO)
    assert job_image(study) == image
    # Snakemake formats the rule's shell command; apptainer runs it in the working directory (--home $PWD).
    shell = train_command(study).format(input=NS(run="r/run.json"), threads=8, log=NS(train="l", launch="j"))
    cli = f"{PROJECT_PYTHONPATH} python3 -m ftscale.cli" if image else "ftscale"
    assert shell == f"{cli} train r/run.json --cpus 8 --log l --launch-record j"
    imported = import_command(study).format(wildcards=NS(model="m"), output="models/m/model", log="i.log")
    assert imported == f"{cli} import m --out models/m/model > i.log 2>&1"


# --- a real container ---------------------------------------------------------------------------------------

IMAGE_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/etc")


def _python_dirs() -> list[str]:
    """The Python installation(s) of the image, where they lie outside its system folders (pyenv, a venv)."""
    dirs = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix)}
    return sorted(d for d in dirs if not any(d == s or d.startswith(s + "/") for s in IMAGE_DIRS))


def ftscale_install() -> list[Path]:
    """What installs ftscale in this Python: the top-level entries of its distribution in site-packages and
    its scripts (none when it is only on PYTHONPATH)."""
    try:
        dist = importlib.metadata.distribution("ftscale")
    except importlib.metadata.PackageNotFoundError:
        return []
    site = Path(dist.locate_file("")).resolve()
    found = set()
    for file in dist.files or []:
        path = Path(dist.locate_file(file)).resolve()
        found.add(site / path.relative_to(site).parts[0] if path.is_relative_to(site) else path)
    return sorted(p for p in found if p.exists())


def image_args() -> list[str]:
    """bubblewrap's arguments for the image: the system read-only, ftscale masked, a private /tmp."""
    args = ["--die-with-parent", "--unshare-pid", "--unshare-ipc", "--proc", "/proc", "--dev", "/dev",
            "--tmpfs", "/dev/shm", "--tmpfs", "/tmp"]
    for d in (*IMAGE_DIRS, *_python_dirs()):
        if os.path.exists(d):
            args += ["--ro-bind", d, d]
    for path in ftscale_install():
        args += ["--tmpfs", str(path)] if path.is_dir() else ["--ro-bind", "/dev/null", str(path)]
    return args


def image_env() -> dict[str, str]:
    """The job's environment inside: no PYTHONPATH, a PATH with the image's Python first."""
    return {"PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp",
            "LANG": "C.UTF-8", "HF_HUB_OFFLINE": "1", MARK: os.environ.get(MARK, "")}


def in_container(mounts: list[tuple[str, str]], workdir: str, command: list[str],
                 extra: list[str] = ()) -> subprocess.CompletedProcess:
    args = ["bwrap", *image_args(), *extra]
    for src, dst in mounts:
        args += ["--bind", src, dst]
    args += ["--chdir", workdir, "--", *command]
    return subprocess.run(args, env=image_env(), capture_output=True, text=True, timeout=600)


#: The stand-in for pyxis's srun: the step's command inside the image, with the step's mounts and working
#: directory (the job's PYTHONPATH passed in, as srun passes the job's environment).
FAKE_SRUN = """#!{python}
import os, subprocess, sys
sys.path[:0] = {paths!r}
from test_container import in_container
args, options = sys.argv[1:], {{}}
while args and args[0].startswith("--"):
    key, _, value = args.pop(0)[2:].partition("=")
    options[key] = value
mounts = [tuple(m.split(":")[:2]) for m in options["container-mounts"].split(",")]
extra = ["--setenv", "PYTHONPATH", os.environ.get("PYTHONPATH", "")]
done = in_container(mounts, options["container-workdir"], args, extra=extra)
sys.stdout.write(done.stdout)
sys.stderr.write(done.stderr)
sys.exit(done.returncode)
"""


def pyxis_batch(script: Path, submit_dir: Path, bin_dir: Path) -> subprocess.CompletedProcess:
    """The batch script run as Slurm runs it, from the submit directory, with pyxis's srun on its PATH."""
    bin_dir.mkdir(exist_ok=True)
    srun = bin_dir / "srun"
    helpers = [str(Path(__file__).parent), str(TESTS / "support")]  # test_container and what it imports
    srun.write_text(FAKE_SRUN.format(python=sys.executable, paths=helpers))
    srun.chmod(0o755)
    env = {**image_env(), "PATH": f"{bin_dir}:{image_env()['PATH']}", "SLURM_SUBMIT_DIR": str(submit_dir)}
    return subprocess.run(["bash", str(script)], cwd=submit_dir, env=env, capture_output=True, text=True,
                          timeout=900)


@pytest.fixture(scope="module")
def bubblewrap(tmp_path_factory) -> None:
    """bubblewrap, able to make its namespaces here (skip, with the reason, where the machine cannot)."""
    if shutil.which("bwrap") is None:
        msg = "bubblewrap is not installed (bash .ci/slurm/install installs it)"
        if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    probe = subprocess.run(["bwrap", *image_args(), "--", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"bubblewrap cannot start a container on this machine (user or mount namespaces): "
                    f"{probe.stderr.strip()}")


def test_a_training_job_runs_inside_an_image_without_ftscale(bubblewrap, tmp_path, monkeypatch):
    root = copy_workflow(tmp_path / "study")
    shutil.copytree(REPO / "scripts", root / "scripts", ignore=shutil.ignore_patterns("__pycache__"))
    # The image has Python with torch, but not ftscale: not as a module, not as a command.
    lacks = in_container([(str(root), str(root))], str(root),
                         ["bash", "-c", "python3 -c 'import torch' "
                          "&& ! ftscale --version 2>/dev/null && ! python3 -c 'import ftscale' 2>/dev/null"])
    assert lacks.returncode == 0, f"the image is not Python with torch but without ftscale:\n{lacks.stderr}"

    monkeypatch.chdir(root)  # the workflow's view: every path relative to the study's root
    study = default_study(Path("."))
    run = one_process_run(study)
    model = study.models["tiny_llama"]
    import_script = root / model.directory / "import.sbatch"
    write_text(render_import_sbatch(model, study.config, IMAGE), import_script)
    imported = pyxis_batch(import_script, root, tmp_path / "bin")
    assert imported.returncode == 0, f"import.sbatch in the container:\n{imported.stdout}\n{imported.stderr}"

    run_dir = root / run.directory
    run_dir.mkdir(parents=True)
    write_run_files(run.to_dict(), render_run_sbatch(run, study.config, IMAGE), str(run_dir / "run.json"),
                    str(run_dir / "run.sbatch"), str(tmp_path / "configure.log"))
    trained = pyxis_batch(run_dir / "run.sbatch", root, tmp_path / "bin")
    assert trained.returncode == 0, f"run.sbatch in the container:\n{trained.stdout}\n{trained.stderr}"
    record = parse_run(run_dir, root=root)
    assert (record.status, record.reason) == ("ok", ""), (run_dir / "train.log").read_text()[-3000:]
