# Fine-tuning scaling study: import -> run -> analyze. All logic lives in scripts/ftscale.
from snakemake.utils import min_version

min_version("9.0")


# The embedded default, unless --configfile names another (which then stands alone, not merged).
if not workflow.overwrite_configfiles:

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
