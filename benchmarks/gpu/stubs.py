"""Writes two import stand-ins into a directory (argv[1]) for NeMo on the lent GPU machine, which has no network.

Visible workaround, not a fake result: nothing here runs during training.
- ``leptonai``: nemo_run imports it at import time, only for its Lepton executor; the real package pulls
  fastapi, opentelemetry and ray. Any attribute is a placeholder class; calling one raises ImportError.
- ``pulp``: nvidia-modelopt's searcher imports it at module level (16 MB wheel); LoRA training never searches.
"""

import sys
from pathlib import Path

PLACEHOLDER = '''"""Import stand-in written by benchmarks/gpu/stubs.py (offline NeMo): using it raises ImportError."""
class _Placeholder(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(cls.__name__ + "." + name, (), {})
    def __call__(cls, *args, **kwargs):
        raise ImportError(f"{cls.__name__} is a stand-in (benchmarks/gpu/stubs.py); the real package is not installed")
def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _Placeholder(name, (), {})
__version__ = "0.0.0+stub"
'''
LEPTONAI_MODULES = (
    "api", "api/v1", "api/v1/types", "api/v1/types/affinity", "api/v1/types/common",
    "api/v1/types/dedicated_node_group", "api/v1/types/deployment", "api/v1/types/job",
    "api/v1/types/replica", "api/v1/types/raycluster", "api/v2", "api/v2/client", "cli", "cli/raycluster",
)  # fmt: skip


def write_stubs(target: Path) -> list[Path]:
    """Writes every stand-in module as a package ``__init__.py`` under ``target``; returns the files written."""
    packages = ["leptonai", "pulp"] + [f"leptonai/{module}" for module in LEPTONAI_MODULES]
    written = []
    for package in packages:
        init = target / package / "__init__.py"
        init.parent.mkdir(parents=True, exist_ok=True)
        init.write_text(PLACEHOLDER)
        written.append(init)
    return written


if __name__ == "__main__":
    print(f"{len(write_stubs(Path(sys.argv[1])))} stand-in modules written to {sys.argv[1]}")
