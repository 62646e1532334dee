# import: each model's checkpoint, written once, then read-only for every experiment. The Hugging
# Face checkpoint (models/<m>/model) serves the embedded and automodel engines; NeMo's conversion of
# it (models/<m>/nemo) the nemo engine.


localrules:
    render_import_sbatch,


rule render_import_sbatch:
    input:
        MODEL_FILE("spec"),
    output:
        MODEL_FILE("import_sbatch"),
    log:
        MODEL_FILE("render_log"),
    params:
        text=import_sbatch,
    run:
        write_text(params.text, output[0], log[0])


rule import_model:
    input:
        ancient(MODEL_FILE("spec")),
    output:
        protected(directory(MODEL_FILE("checkpoint"))),
    log:
        MODEL_FILE("import_log"),
    benchmark:
        MODEL_FILE("import_benchmark")
    conda:
        "envs/ftscale.yaml"
    container:
        container_image(STUDY)
    resources:
        gpu=import_resources(STUDY.config).gpus,
        cpus_per_task=import_resources(STUDY.config).cpus,
        mem_mb=import_mem_mb,
        runtime=import_runtime,
    shell:
        import_command(STUDY)


rule import_nemo:
    input:
        ancient(MODEL_FILE("checkpoint")),
    output:
        protected(directory(MODEL_FILE("nemo_checkpoint"))),
    log:
        MODEL_FILE("nemo_import_log"),
    conda:
        "envs/ftscale.yaml"
    container:
        container_image(STUDY)
    resources:
        gpu=import_resources(STUDY.config).gpus,
        cpus_per_task=import_resources(STUDY.config).cpus,
        mem_mb=import_mem_mb,
        runtime=import_runtime,
    shell:
        conversion_command(STUDY, "nemo_checkpoint") + " > {log} 2>&1"


rule import_all:
    input:
        sorted({run.checkpoint for run in STUDY.runs}),
        model_files(STUDY, "import_sbatch"),
