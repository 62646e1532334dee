# import: each model's checkpoint, written once, then read-only for every experiment.


localrules:
    render_import_sbatch,


rule render_import_sbatch:
    input:
        "models/{model}/model.yaml",
    output:
        "models/{model}/import.sbatch",
    log:
        "models/{model}/render.log",
    params:
        text=import_sbatch,
    run:
        write_text(params.text, output[0], log[0])


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
    container:
        container_image()

    resources:
        gpu=import_resources(STUDY.config).gpus,
        cpus_per_task=import_resources(STUDY.config).cpus,
        mem_mb=lambda wc, attempt: import_resources(STUDY.config, attempt).mem_mb,
        runtime=lambda wc, attempt: import_resources(STUDY.config, attempt).runtime_min,
    shell:
        "ftscale import {wildcards.model} --out {output} --engine {params.engine} > {log} 2>&1"


rule import_all:
    input:
        expand("models/{model}/model", model=STUDY.models),
        expand("models/{model}/import.sbatch", model=STUDY.models),
