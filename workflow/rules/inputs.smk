# Inputs every probe shares: tiny models built from configs, and dataset index files.


rule build_tiny_model:
    output:
        directory("results/models/{model}"),
    log:
        "results/logs/models/{model}.log",
    benchmark:
        "results/benchmarks/models/{model}.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=scaled(4000),
        runtime=scaled(10),
    params:
        family=lambda w: PLAN.model(w.model)["family"],
        arch=lambda w: PLAN.model(w.model)["arch"],
        seed=lambda w: PLAN.model(w.model).get("seed", 0),
    shell:
        "layerscope build-model --family {params.family:q} --arch {params.arch:q} --seed {params.seed:q} --out {output:q} > {log:q} 2>&1"


rule dataset_index:
    output:
        "results/data/{dataset}/index.tsv",
    log:
        "results/logs/data/{dataset}.log",
    benchmark:
        "results/benchmarks/data/{dataset}.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=scaled(2000),
        runtime=scaled(10),
    params:
        spec=lambda w: json.dumps(PLAN.dataset(w.dataset)),
        # listing + size + mtime of every image: adding or changing an image changes this param,
        # so the index (and the shards that read it) rerun; the index's digest covers image bytes
        content=lambda w: dataset_fingerprint(w.dataset),
    shell:
        "layerscope dataset-index --name {wildcards.dataset:q} --spec {params.spec:q} --out {output:q} > {log:q} 2>&1"
