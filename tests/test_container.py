"""Jobs inside a container image that does not have ftscale (NVIDIA's NeMo image): the rendered pyxis lines
and the rules' commands as text, and a real import and training job inside a container.

The container runtime is bubblewrap (Debian's ``bubblewrap``, installed by .ci/slurm/install). It plays
pyxis: the batch script runs inside the image with the script's own ``--container-mounts`` and
``--container-workdir``, nothing else of the host. The image is this machine's system, read-only (/usr,
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
from workflow import REPO, copy_workflow

from ftscale.analyze.parse import parse_run
from ftscale.run.command import PROJECT_PYTHONPATH
from ftscale.run.configure import write_run_files, write_text
from ftscale.run.sbatch import render_import_sbatch, render_run_sbatch
from ftscale.study.sweep import load_config_file
from ftscale.workflow import container_image, import_command, job_image, train_command, workflow_study

IMAGE = "nvcr.io/nvidia/nemo:25.09"


def sbatch_options(script: str) -> dict[str, str]:
    """The ``#SBATCH --key=value`` options of a batch script, as sbatch reads them: up to the first command."""
    options = {}
    for line in script.splitlines()[1:]:
        if line.startswith("#SBATCH"):
            for word in shlex.split(line[len("#SBATCH"):]):
                key, _, value = word.removeprefix("--").partition("=")
                options[key] = value
        elif line.strip() and not line.startswith("#"):
            break
    return options


def default_study(root: Path):
    return workflow_study(load_config_file(root / "config" / "config.yaml"), ["config/config.yaml"], root=root)


def one_process_run(study):
    return next(r for r in study.runs if r.track == "data_parallel" and r.model == "tiny_llama" and r.gpus == 1)


# --- the text: pyxis lines and the rules' commands ------------------------------------------------------------

def test_pyxis_mounts_the_project_at_its_own_path_and_runs_its_sources():
    study = default_study(REPO)
    run = one_process_run(study)
    text = render_run_sbatch(run, study.config, Path("/scratch/me/study"), IMAGE)
    options = sbatch_options(text)
    assert options["container-image"] == IMAGE
    assert options["container-mounts"] == "/scratch/me/study:/scratch/me/study"
    assert options["container-workdir"] == "/scratch/me/study"
    assert not [line for line in text.splitlines() if line.startswith("#SBATCH") and " #" in line]
    body = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert body[1] == "cd /scratch/me/study"
    assert body[2] == (f"{PROJECT_PYTHONPATH} python3 -m ftscale.cli train {run.directory}/run.json "
                       f"--log {run.directory}/train.log --launch-record {run.directory}/launch.json")
    model = render_import_sbatch(study.models["tiny_llama"], study.config, Path("/scratch/me/study"), IMAGE)
    assert sbatch_options(model)["container-mounts"] == "/scratch/me/study:/scratch/me/study"
    assert f"{PROJECT_PYTHONPATH} python3 -m ftscale.cli import tiny_llama --out " in model


def test_without_a_container_the_jobs_run_the_installed_ftscale():
    study = default_study(REPO)
    text = render_run_sbatch(one_process_run(study), study.config, Path("/scratch/me/study"), job_image(study))
    assert not [k for k in sbatch_options(text) if k.startswith("container")]
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


def pyxis_batch(script: Path, submit_dir: Path) -> subprocess.CompletedProcess:
    """The batch script run as pyxis runs it: inside the image, with its own mounts and working directory."""
    options = sbatch_options(script.read_text())
    assert options.get("container-image"), f"{script}: no #SBATCH --container-image line"
    mounts = []
    for mount in options["container-mounts"].split(","):
        src, dst = mount.split(":")[:2]
        mounts.append((str((submit_dir / src).resolve()), dst))
    return in_container(mounts, options["container-workdir"], ["bash", "/tmp/slurm_script"],
                        extra=["--ro-bind", str(script), "/tmp/slurm_script",
                               "--setenv", "SLURM_SUBMIT_DIR", str(submit_dir)])


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


def test_a_training_job_runs_inside_an_image_without_ftscale(bubblewrap, tmp_path):
    root = copy_workflow(tmp_path / "study")
    shutil.copytree(REPO / "scripts", root / "scripts", ignore=shutil.ignore_patterns("__pycache__"))
    # The image has Python with torch, but not ftscale: not as a module, not as a command.
    lacks = in_container([(str(root), str(root))], str(root),
                         ["bash", "-c", "python3 -c 'import torch' "
                          "&& ! ftscale --version 2>/dev/null && ! python3 -c 'import ftscale' 2>/dev/null"])
    assert lacks.returncode == 0, f"the image is not Python with torch but without ftscale:\n{lacks.stderr}"

    study = default_study(root)
    run = one_process_run(study)
    model = study.models["tiny_llama"]
    import_script = root / model.directory / "import.sbatch"
    write_text(render_import_sbatch(model, study.config, root, IMAGE), import_script)
    imported = pyxis_batch(import_script, root)
    assert imported.returncode == 0, f"import.sbatch in the container:\n{imported.stdout}\n{imported.stderr}"

    run_dir = root / run.directory
    run_dir.mkdir(parents=True)
    write_run_files(run.to_dict(), render_run_sbatch(run, study.config, root, IMAGE), str(run_dir / "run.json"),
                    str(run_dir / "run.sbatch"), str(tmp_path / "configure.log"))
    trained = pyxis_batch(run_dir / "run.sbatch", root)
    assert trained.returncode == 0, f"run.sbatch in the container:\n{trained.stdout}\n{trained.stderr}"
    record = parse_run(run_dir, root=root)
    assert (record.status, record.reason) == ("ok", ""), (run_dir / "train.log").read_text()[-3000:]
