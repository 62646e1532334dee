# analyze: every run's log -> results/scaling.csv, results/tables.md and results/plots/*.png, each in
# `snakemake --report results/report.html` (captions in rules/report/). Optional: results/comparison.md
# against other participants' exported CSVs in results/participants/.
from ftscale.analyze.compare import write_comparison
from ftscale.analyze.plots import PLOTS
from ftscale.analyze.results import REDO_FILE, mark_for_redo, write_tables

# Read when the workflow starts: a file added later counts from the next invocation.
PARTICIPANT_CSVS = sorted(str(p) for p in Path("results/participants").glob("*.csv"))

# A run whose outputs were deleted, damaged or changed after the tables were written is redone, and the
# tables with it, by the main command (ftscale.analyze.results.mark_for_redo says how); only the main
# process looks, and a dry run (-n) only says what the main command will do, changing nothing.
if workflow.is_main_process:
    DRY_RUN = workflow.output_settings.dryrun
    HAD_TABLES = Path("results/tables.md").exists()
    REDO = clear_errors(mark_for_redo, STUDY, write=not DRY_RUN)
    if REDO and HAD_TABLES:
        print(
            f"[ftscale] {len(REDO)} run(s) to do again" + (" by the next command without -n" if DRY_RUN else "") + ":",
            *(f"{d}: {why}" for d, why in REDO.items()),
            sep="\n  ",
        )

# Written by the first main command: a dry run before it plans the tables without it.
REDO_INPUT = [str(REDO_FILE)] if REDO_FILE.exists() else []


report: "report/workflow.rst"


localrules:
    tables,
    compare,


rule tables:
    input:
        runs=run_files(STUDY, "run"),
        metrics=run_files(STUDY, "metrics"),
        references=STUDY.config["references"],
        redo=REDO_INPUT,
    output:
        csv=report("results/scaling.csv", caption="report/scaling.rst", category="Tables"),
        md=report("results/tables.md", caption="report/tables.rst", category="Tables"),
        plots=[
            report(f"results/plots/{stem}.png", caption=f"report/{stem}.rst", category="Plots", labels={"plot": title})
            for stem, title in PLOTS.items()
        ],
    log:
        "results/logs/tables.log",
    run:
        clear_errors(write_tables, STUDY, Path(output.csv), Path(output.md), Path("results/plots"), Path(log[0]))


rule compare:
    input:
        own="results/scaling.csv",
        participants=PARTICIPANT_CSVS,
    output:
        md=report("results/comparison.md", caption="report/comparison.rst", category="Comparison"),
        png=report("results/plots/comparison.png", caption="report/comparison.rst", category="Comparison"),
    log:
        "results/logs/compare.log",
    run:
        write_comparison(input.own, input.participants, output.md, output.png, log=log[0])
