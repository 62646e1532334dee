# import: each model's checkpoint, written once, then read-only for every experiment.


rule import_model:
    input:
        ancient("models/{model}/model.yaml"),
    output:
        protected(directory("models/{model}/model")),
    log:
        "models/{model}/import.log",
    benchmark:
        "models/{model}/import.benchmark.tsv"
    params:
        engine=STUDY.config["engine"],
    conda:
        "envs/ftscale.yaml"

    resources:
        mem_mb=8000,
        runtime=120,
    shell:
        "ftscale import {wildcards.model} --out {output} --engine {params.engine} > {log} 2>&1"


rule import_all:
    input:
        expand("models/{model}/model", model=STUDY.models),
