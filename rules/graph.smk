# The workflow's graph of rules, for people: results/dag.svg (graphviz) or results/dag.mmd (Mermaid).
from ftscale.dag import default_target, render
from ftscale.workflow import relative_configfiles


localrules:
    dag,
    render_dag,


rule render_dag:
    output:
        "results/dag.{ext,svg|mmd}",
    log:
        "results/logs/dag.{ext}.log",
    params:
        configfiles=relative_configfiles(workflow.overwrite_configfiles),
    run:
        render(Path(output[0]), params.configfiles)


rule dag:
    input:
        default_target(),
