# Four rules per enabled probe, generated from the probe's declarations (layerscope.probes):
#   <probe>_spec     one local job per model: what its shards share -> results/<probe>/specs/<model>.json
#                    (rewritten when the model, data or settings change, so exactly the affected shards rerun)
#   <probe>_shard    one job per (model, axis values): GPU work -> results/<probe>/shards/<model>/<shard>.h5
#   <probe>_merge    one job per model: validated shards -> results/<probe>/tables/<model>/*.csv
#   <probe>_figures  one job per probe: every model's tables -> results/<probe>/figures/*.png (in the report)
# Every rule has a benchmark: file under results/benchmarks/ (wall time, max RSS; TSV), and every
# shard log carries flushed progress lines (`tail -f results/logs/<probe>/shards/<model>/<shard>.log`).

for _probe, _impl in PLAN.probes.items():

    rule:
        name:
            f"{_probe}_spec"
        input:
            lambda w, p=_probe: PLAN.shard_inputs(p, w.model),
        output:
            f"results/{_probe}/specs/{{model}}.json",
        log:
            f"results/logs/{_probe}/specs/{{model}}.log",
        benchmark:
            f"results/benchmarks/{_probe}/specs/{{model}}.tsv"
        localrule: True
        conda:
            ENV
        threads: 1
        resources:
            mem_mb=scaled(1000),
            runtime=scaled(5),
        params:
            spec=lambda w, p=_probe: PLAN.base_spec_json(p, w.model),
        shell:
            "layerscope write-spec --spec {params.spec:q} --out {output} > {log} 2>&1"

    # static input and no per-job functions: a 10,000-shard dry run stays close to a bare Snakefile's
    rule:
        name:
            f"{_probe}_shard"
        input:
            spec=f"results/{_probe}/specs/{{model}}.json",
        output:
            **extra_outputs(_probe, _impl),
            shard=f"results/{_probe}/shards/{{model}}/{{shard}}.h5",
        log:
            f"results/logs/{_probe}/shards/{{model}}/{{shard}}.log",
        # wall time (s) and peak RSS (max_rss, MB) of every shard; `layerscope status` sums GPU hours
        benchmark:
            f"results/benchmarks/{_probe}/shards/{{model}}/{{shard}}.tsv"
        conda:
            ENV
        threads: PLAN.threads(_probe)
        resources:
            **probe_resources(_probe, 1 if _impl.gpu else 0),
        shell:
            "layerscope run-shard --spec @{input.spec} --shard {wildcards.shard} --threads {threads}"
            " --out {output.shard} > {log} 2>&1"

    rule:
        name:
            f"{_probe}_merge"
        input:
            # the shard folder is an input too: deleting a shard changes its mtime, so the merge (and
            # with it the missing shard) runs again; Snakemake alone skips missing intermediates
            shard_dir=lambda w, p=_probe: shard_dir(p, w.model),
            shards=lambda w, p=_probe: PLAN.shard_paths(p, w.model),
        output:
            [f"results/{_probe}/tables/{{model}}/{t}.csv" for t in _impl.tables],
        log:
            f"results/logs/{_probe}/merge/{{model}}.log",
        benchmark:
            f"results/benchmarks/{_probe}/merge/{{model}}.tsv"
        conda:
            ENV
        threads: 1
        resources:
            mem_mb=scaled(4000),
            runtime=scaled(30),
        params:
            probe=_probe,
            expect=lambda w, p=_probe: PLAN.config_hash(p, w.model),
        shell:
            "layerscope merge --probe {params.probe} --model {wildcards.model} --expect-hash {params.expect}"
            " --out-dir results/{params.probe}/tables/{wildcards.model} {input.shards} > {log} 2>&1"

    rule:
        name:
            f"{_probe}_figures"
        input:
            lambda w, p=_probe: [t for m in PLAN.models_of(p) for t in PLAN.table_paths(p, m)],
        output:
            [
                report(
                    f"results/{_probe}/figures/{f}.png",
                    caption=caption(_probe, f),
                    category=_probe,
                )
                for f in _impl.figures
            ],
        log:
            f"results/logs/{_probe}/figures.log",
        benchmark:
            f"results/benchmarks/{_probe}/figures.tsv"
        conda:
            ENV
        threads: 1
        resources:
            mem_mb=scaled(4000),
            runtime=scaled(30),
        params:
            probe=_probe,
            tables=lambda w, p=_probe: [f"results/{p}/tables/{m}" for m in PLAN.models_of(p)],
            caption=lambda w: f"(config {', '.join(map(str, workflow.configfiles)) or 'config.yaml'})",
        shell:
            "layerscope plot --probe {params.probe} --out-dir results/{params.probe}/figures"
            " --caption {params.caption:q} {params.tables} > {log} 2>&1"
