"""The README and the docs say what the product does: short README, links that resolve, commands that run
(as a dry run), figures of the default study that match its real dry run and config, every config key
documented in config/README.md."""

from __future__ import annotations

import re
import shlex

import pytest
import yaml
from paths import REPO
from workflow import copy_workflow, snakemake

README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md")) + [REPO / "config" / "README.md", README]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def code_commands(text: str) -> list[str]:
    """The command lines of the ```bash blocks of a Markdown text (comments and continuations joined)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


@pytest.fixture(scope="module")
def readme() -> str:
    return README.read_text()


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


@pytest.fixture(scope="module")
def default_dry_run(tmp_path_factory, readme) -> str:
    """`snakemake -n` of the README's main command, in a copy of the workflow (no runs, no results)."""
    main = [c for c in code_commands(readme) if c.startswith("snakemake")]
    assert main == ["snakemake --cores all results/tables.md"], main
    work = copy_workflow(tmp_path_factory.mktemp("readme"))
    return snakemake(work, *shlex.split(main[0])[1:], "-n", timeout=120).stdout


def test_readme_is_short(readme):
    assert len(readme.splitlines()) <= 150


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    """Every relative link (and image) of README.md, docs/*.md and config/README.md names a file that exists;
    links into scripts/ are left out (the code moves under them)."""
    missing = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (page.parent / target.split("#", 1)[0]).resolve()
        if REPO / "scripts" in path.parents:
            continue
        if not path.exists():
            missing.append(target)
    assert not missing, f"{page.relative_to(REPO)}: links to missing files: {missing}"


def test_readme_commands_exist(readme):
    commands = code_commands(readme)
    assert "bash .ci/setup" in commands and (REPO / ".ci" / "setup").is_file()
    assert "python3 -m pytest" in commands
    assert (REPO / "docs" / "img" / "default-mp-memory.png").stat().st_size < 100_000


def default_runs(config: dict) -> tuple[list[tuple[str, int]], list[tuple[str, str, int]]]:
    """The default's runs from config/config.yaml: (model, gpus) of the data-parallel track (one scaling
    mode, one batch shape) and (model, layout label, gpus) of the model-parallel track."""
    tracks, batch = config["tracks"], config["batch"]
    assert len(tracks["data_parallel"]["scaling"]) == 1
    assert not isinstance(batch["micro_batch"], list) and not isinstance(batch["seq_length"], list)
    dp = [(m, g) for m in config["models"] for g in tracks["data_parallel"]["gpus"]]
    mp = []
    for model, layouts in tracks["model_parallel"]["layouts"].items():
        for lay in layouts:
            tp, ep, dpn = lay.get("tp", 1), lay.get("ep", 1), lay.get("dp", 1)
            label = " ".join([f"tp{tp}"] * (tp > 1) + [f"ep{ep}"] * (ep > 1) + [f"dp{dpn}"] * (dpn > 1)
                             + ["sp"] * bool(lay.get("sp")))
            mp.append((model, label, tp * ep * dpn))
    return dp, mp


def test_readme_figures_match_the_default_dry_run_and_config(readme, config, default_dry_run):
    dp, mp = default_runs(config)
    trains = re.search(r"^train\s+(\d+)$", default_dry_run, re.M)
    assert trains, default_dry_run[-2000:]
    assert int(trains[1]) == len(dp) + len(mp)
    assert f"The default study has {len(dp) + len(mp)} runs" in readme
    gpus = config["tracks"]["data_parallel"]["gpus"]
    counted = ", ".join(map(str, gpus[:-1])) + f" and {gpus[-1]}"
    per_model = len(gpus)
    scaling = config["tracks"]["data_parallel"]["scaling"][0]
    assert f"{scaling} scaling, on {counted} processes: {per_model} runs per model, {len(dp)} in all" in readme
    assert f"{len(mp)} runs" in readme
    # the model-state table: one row per model-parallel run, the layouts of config/config.yaml
    rows = re.findall(r"^\| (tiny_\w+) \| ([a-z0-9 ]+) \| (\d+) \| [\d.]+ \|$", readme, re.M)
    assert sorted((m, lay, int(g)) for m, lay, g in rows) == sorted(mp)
    # the models named in the README are the default's
    assert set(config["models"]) == {m for m, _, _ in mp}


def schema_keys(node: dict, defs: dict, prefix: str = "") -> list[str]:
    """Every dotted key path of a JSON schema node (``$ref`` followed; per-name maps as ``<model>``)."""
    if "$ref" in node:
        node = {**defs[node["$ref"].rsplit("/", 1)[1]], **{k: v for k, v in node.items() if k != "$ref"}}
    if node.get("type") == "array" and isinstance(node.get("items"), dict):
        return schema_keys(node["items"], defs, prefix)
    keys = []
    for name, child in (node.get("properties") or {}).items():
        path = f"{prefix}.{name}" if prefix else name
        keys += [path, *schema_keys(child, defs, path)]
    if isinstance(node.get("additionalProperties"), dict):
        keys += schema_keys(node["additionalProperties"], defs, f"{prefix}.<model>")
    return keys


def test_config_readme_documents_every_schema_key():
    """The schema's keys, and each engine's options (its section is checked by the engine's Options dataclass)."""
    import dataclasses

    from ftscale.engines import engine, names

    schema = yaml.safe_load((REPO / "config" / "config.schema.yaml").read_text())
    keys = schema_keys(schema, schema["$defs"])
    keys += [f"{name}.{f.name}" for name in names() for f in dataclasses.fields(engine(name).Options)]
    assert "tracks.model_parallel.layouts.<model>.tp" in keys and "embedded.lora_dtype" in keys
    text = (REPO / "config" / "README.md").read_text()
    undocumented = [k for k in keys if f"`{k}`" not in text]
    assert not undocumented, f"config/README.md does not document: {undocumented}"
