# run: one fine-tuning job per configuration, in experiments/<track>/<model>/<name>/.


localrules:
    configure_run,


rule configure_run:
    output:
        "experiments/{track}/{model}/{name}/run.json",
    log:
        "experiments/{track}/{model}/{name}/configure.log",
    params:
        run=run_params,
    run:
        write_run_json(params.run, output[0], log[0])


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
    threads: run_gpus
    resources:
        gpu=run_gpus,
        mem_mb=lambda wc, attempt: 4000 * attempt,
        runtime=lambda wc, attempt: 30 * attempt,
    shell:
        "ftscale train {input.run} --log {log.train} --launch-record {log.launch}"


rule train_data_parallel:
    input:
        [f"{d}/metrics.jsonl" for d in all_run_dirs() if d.startswith("experiments/data_parallel/")],


rule train_model_parallel:
    input:
        [f"{d}/metrics.jsonl" for d in all_run_dirs() if d.startswith("experiments/model_parallel/")],
