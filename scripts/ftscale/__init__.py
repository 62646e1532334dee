"""ftscale: library code of the fine-tuning scaling-study workflow (import -> run -> analyze).

The Snakefile and rules/ only wire files together; everything they do is a call into this package.
"""

from pathlib import Path

#: The repository root when the package is used from a checkout (pip install -e .).
REPO_ROOT = Path(__file__).resolve().parents[2]
