# run: one fine-tuning job per configuration, in experiments/<track>/<model>/<engine>_<layout>_<batch>/.


localrules:
    configure_run,


rule configure_run:
    output:
        run=RUN_FILE("run"),
        sbatch=RUN_FILE("sbatch"),
    log:
        RUN_FILE("configure_log"),
    params:
        run=run_params,
        sbatch=run_sbatch,
    run:
        write_run_files(params.run, params.sbatch, output.run, output.sbatch, log[0])


rule train:
    input:
        run=RUN_FILE("run"),
        checkpoint=run_checkpoint,
        dataset=run_dataset,
    output:
        RUN_FILE("metrics"),
    log:
        train=RUN_FILE("log"),
        launch=RUN_FILE("launch"),
    benchmark:
        RUN_FILE("benchmark")
    conda:
        "envs/ftscale.yaml"
    container:
        container_image(STUDY)
    threads: train_threads
    resources:
        gpu=train_placement("gpu"),
        gres=train_placement("gres"),
        nodes=train_nodes,
        mpi=train_placement("mpi"),
        tasks=train_placement("tasks"),
        tasks_per_gpu=train_placement("tasks_per_gpu"),
        cpus_per_task=train_threads,
        mem_mb=train_mem_mb,
        runtime=train_runtime,
    shell:
        train_command(STUDY)


rule train_data_parallel:
    input:
        run_files(STUDY, "metrics", "data_parallel"),


rule train_model_parallel:
    input:
        run_files(STUDY, "metrics", "model_parallel"),


rule sbatch_scripts:
    input:
        run_files(STUDY, "sbatch"),
        model_files(STUDY, "import_sbatch"),
