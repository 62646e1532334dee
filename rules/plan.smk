# plan: every run's predicted memory per GPU and step time, before any job (no GPU, no training):
# snakemake results/plan.md --cores 1 [--configfile ...]
from ftscale.analyze.plan_report import write_plan
from ftscale.workflow import plan_inputs


localrules:
    plan,


rule plan:
    input:
        models=model_files(STUDY, "spec"),
    output:
        csv="results/plan.csv",
        md="results/plan.md",
    log:
        "results/logs/plan.log",
    params:
        study=plan_inputs(STUDY),
    run:
        write_plan(STUDY, Path(output.csv), Path(output.md))
