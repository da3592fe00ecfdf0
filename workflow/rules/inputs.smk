# Inputs every probe shares: tiny models built from configs, and dataset index files.


rule build_tiny_model:
    output:
        directory("results/models/{model}"),
    params:
        family=lambda w: PLAN.model(w.model)["family"],
        arch=lambda w: PLAN.model(w.model)["arch"],
        seed=lambda w: PLAN.model(w.model).get("seed", 0),
    log:
        "results/logs/models/{model}.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=10,
    conda:
        ENV
    shell:
        LAYERSCOPE + " build-model --family {params.family} --arch {params.arch} --seed {params.seed} --out {output} > {log} 2>&1"


rule dataset_index:
    output:
        "results/data/{dataset}/index.tsv",
    params:
        spec=lambda w: json.dumps(PLAN.dataset(w.dataset)),
    log:
        "results/logs/data/{dataset}.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        ENV
    shell:
        LAYERSCOPE + " dataset-index --name {wildcards.dataset} --spec {params.spec:q} --out {output} > {log} 2>&1"
