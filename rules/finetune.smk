# run: one fine-tuning job per configuration, in experiments/<track>/<model>/<name>/.


localrules:
    configure_run,


rule configure_run:
    output:
        run="experiments/{track}/{model}/{name}/run.json",
        sbatch="experiments/{track}/{model}/{name}/run.sbatch",
    log:
        "experiments/{track}/{model}/{name}/configure.log",
    params:
        run=run_params,
        sbatch=run_sbatch,
    run:
        write_run_files(params.run, params.sbatch, output.run, output.sbatch, log[0])


rule train:
    input:
        run="experiments/{track}/{model}/{name}/run.json",
        checkpoint="models/{model}/model",
    output:
        "experiments/{track}/{model}/{name}/metrics.jsonl",
    log:
        train="experiments/{track}/{model}/{name}/train.log",
        launch="experiments/{track}/{model}/{name}/launch.json",
    benchmark:
        "experiments/{track}/{model}/{name}/benchmark.tsv"
    conda:
        "envs/ftscale.yaml"
    container:
        container_image()
    threads: lambda wc: train_resources(run_of(wc), STUDY.config).cpus
    resources:
        gpu=run_gpus,
        nodes=lambda wc: train_resources(run_of(wc), STUDY.config).nodes,
        cpus_per_task=lambda wc: train_resources(run_of(wc), STUDY.config).cpus,
        mem_mb=lambda wc, attempt: train_resources(run_of(wc), STUDY.config, attempt).mem_mb,
        runtime=lambda wc, attempt: train_resources(run_of(wc), STUDY.config, attempt).runtime_min,
    shell:
        "ftscale train {input.run} --cpus {threads} --log {log.train} --launch-record {log.launch}"


rule train_data_parallel:
    input:
        [f"{d}/metrics.jsonl" for d in all_run_dirs() if d.startswith("experiments/data_parallel/")],


rule train_model_parallel:
    input:
        [f"{d}/metrics.jsonl" for d in all_run_dirs() if d.startswith("experiments/model_parallel/")],


rule sbatch_scripts:
    input:
        [f"{d}/run.sbatch" for d in all_run_dirs()],
        expand("models/{model}/import.sbatch", model=STUDY.models),
