"""The shell words that start ftscale's command line in a job, as the rules and the rendered sbatch scripts
write them. A job's working directory is the project (the study's root, with ``scripts/`` in it).

On the nodes, ``ftscale`` is installed. A container image (NVIDIA's NeMo image) does not have it, and an
engine's own interpreter (``<engine>.python``) need not: there the job runs the project's own sources,
``python3 -m ftscale.cli`` with ``$PWD/scripts`` put first on ``PYTHONPATH``. The ranks (and torchrun across
nodes) inherit that environment, so they import the same sources. ``PYTHONPATH`` is extended, not
replaced: an image may set its own.
"""

from __future__ import annotations

import shlex

#: The project's sources first on the path (expanded by the job's shell, inside the container).
PROJECT_PYTHONPATH = 'PYTHONPATH="$PWD/scripts${PYTHONPATH:+:$PYTHONPATH}"'


def ftscale_cli(container: bool, python: str | None = None) -> str:
    """``ftscale``, or, inside a container or under an engine's ``python``, that interpreter (``python3``
    by default) on the project's sources: the words before the subcommand (``train``, ``import``, ...)."""
    if not container and not python:
        return "ftscale"
    return f"{PROJECT_PYTHONPATH} {shlex.quote(python or 'python3')} -m ftscale.cli"
