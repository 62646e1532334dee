# data: the training data, prepared once into experiments/data/<dataset>/ where Snakemake itself runs
# (a login node with network), never on a compute node. Mock data needs no preparation.


localrules:
    prepare_data,


rule prepare_data:
    output:
        directory(DATA_DIR),
    log:
        DATA_LOG,
    params:
        data=STUDY.config["data"],
    run:
        # Imported here, not when the workflow is read: it imports torch, which no other rule needs.
        from ftscale.run.data import prepare_dataset_logged

        prepare_dataset_logged(params.data, output[0], log[0])
