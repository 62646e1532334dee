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
        prepare_dataset_logged(params.data, output[0], log[0])
