# Fine-tuning scaling study: import -> run -> analyze. All logic lives in scripts/ftscale.
from snakemake.utils import min_version

from ftscale.study.sweep import load_config_file

min_version("9.0")


# The embedded default, unless --configfile names another (which then stands alone, not merged). It is
# read through ftscale first: Snakemake's own error for a YAML syntax error names neither file nor line.
# (A --configfile is read by Snakemake's command line before this file runs: `ftscale check-config FILE`.)
if not workflow.overwrite_configfiles:
    load_config_file("config/config.yaml")

    configfile: "config/config.yaml"


include: "rules/common.smk"
include: "rules/plan.smk"
include: "rules/import.smk"
include: "rules/data.smk"
include: "rules/finetune.smk"
include: "rules/analyze.smk"
include: "rules/graph.smk"


rule all:
    default_target: True
    input:
        "results/tables.md",
