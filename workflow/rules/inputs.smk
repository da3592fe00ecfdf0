# Inputs every probe shares: tiny models built from configs, and data slices. Paths: layerscope.layout.


rule build_tiny_model:
    output:
        directory(LAYOUT.model_dir("{model}")),
    log:
        LAYOUT.log("models", "{model}"),
    benchmark:
        LAYOUT.benchmark("models", "{model}")
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


# One job per data slice (IofN of the dataset cut to its first max_images items): items land in a
# slice by a stable key (a hash of their name), and the slice's content fingerprint (names,
# captions, sizes, mtimes of just its items) is a param, so an added or changed image reruns only
# the slice that holds it - and only that slice's shards.
rule dataset_slice:
    output:
        LAYOUT.data_slice_index("{dataset}", "{max_images}", "{slice}"),
    log:
        LAYOUT.log("data", "{dataset}", "max-{max_images}", "{slice}"),
    benchmark:
        LAYOUT.benchmark("data", "{dataset}", "max-{max_images}", "{slice}")
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=scaled(2000),
        runtime=scaled(10),
    params:
        spec=lambda w: PLAN.dataset_json(w.dataset),
        content=lambda w: slice_fingerprint(w.dataset, int(w.max_images), w.slice),
    shell:
        "layerscope dataset-slice --name {wildcards.dataset:q} --spec {params.spec:q} --max-images {wildcards.max_images}"
        " --slice {wildcards.slice} --out {output:q} > {log:q} 2>&1"
