# analyze: every run's log -> results/scaling.csv and results/tables.md.


localrules:
    tables,


rule tables:
    input:
        runs=[f"{d}/run.json" for d in all_run_dirs()],
        metrics=[f"{d}/metrics.jsonl" for d in all_run_dirs()],
        # not read: listed so that the main target also renders each model's standalone import.sbatch
        import_sbatch=expand("models/{model}/import.sbatch", model=STUDY.models),
    output:
        csv="results/scaling.csv",
        md="results/tables.md",
    log:
        "results/logs/tables.log",
    run:
        write_results(STUDY, Path(output.csv), Path(output.md))
