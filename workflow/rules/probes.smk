# Four rules per enabled probe, generated from the probe's declarations (layerscope.probes); every
# path comes from the study's layout (layerscope.layout: results/<study>/...):
#   <probe>_spec     one local job per model: what its shards share -> <probe>/specs/<model>.json
#                    (only that model, its data's slice template, the aux models it uses and the
#                    settings that change its numbers: rewritten when those change, never for
#                    threads, resources, runtime, list order or another model)
#   <probe>_shard    one job per (model, axis values): GPU work -> <probe>/shards/<model>/<shard>.h5
#                    (inputs: the spec and, for data probes, the one data slice it reads)
#   <probe>_merge    one job per model: validated shards -> <probe>/tables/<model>/*.csv (and, for
#                    probes that export images, <probe>/images/<model>/)
#   <probe>_figures  one job per probe: every model's tables -> <probe>/figures/<figure>.png (in the
#                    report, with its caption) and .pdf (its vector copy), for every figure the plan
#                    names (Plan.figure_names: the probe's, and e.g. one grid per model and prompt)
# Every rule has a benchmark: file under benchmarks/ (wall time, max RSS; TSV), and every shard log
# carries flushed progress lines (`tail -f results/<study>/logs/<probe>/shards/<model>/<shard>.log`).

for _probe, _impl in PLAN.probes.items():

    rule:
        name:
            f"{_probe}_spec"
        input:
            lambda w, p=_probe: PLAN.shard_inputs(p, w.model),
        output:
            LAYOUT.spec(_probe, "{model}"),
        log:
            LAYOUT.log(_probe, "specs", "{model}"),
        benchmark:
            LAYOUT.benchmark(_probe, "specs", "{model}")
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

    # a static spec input; data probes add one input function (the shard's data slice)
    rule:
        name:
            f"{_probe}_shard"
        input:
            spec=LAYOUT.spec(_probe, "{model}"),
            data=(lambda w, p=_probe: PLAN.data_inputs(p, w.model, w.shard)) if _impl.datasets_key else [],
        output:
            **extra_outputs(_probe, _impl),
            shard=LAYOUT.shard(_probe, "{model}", "{shard}"),
        log:
            LAYOUT.log(_probe, "shards", "{model}", "{shard}"),
        # wall time (s) and peak RSS (max_rss, MB) of every shard; `layerscope status` sums GPU hours
        benchmark:
            LAYOUT.shard_benchmark(_probe, "{model}", "{shard}")
        conda:
            ENV
        threads: PLAN.threads(_probe)
        resources:
            **probe_resources(_probe, 1 if _impl.gpu else 0),
        params:
            exec=Untracked(PLAN.exec_json(_probe)),
        shell:
            "layerscope run-shard --spec @{input.spec} --shard {wildcards.shard} --threads {threads}"
            " --exec {params.exec:q} --out {output.shard} > {log} 2>&1"

    rule:
        name:
            f"{_probe}_merge"
        input:
            # the shard folder is an input too: deleting a shard changes its mtime, so the merge (and
            # with it the missing shard) runs again; Snakemake alone skips missing intermediates
            shard_dir=lambda w, p=_probe: shard_dir(p, w.model),
            shards=lambda w, p=_probe: PLAN.shard_paths(p, w.model),
        output:
            [LAYOUT.table(_probe, "{model}", t) for t in _impl.tables]
            + ([directory(LAYOUT.images_dir(_probe, "{model}"))] if _impl.exports_images else []),
        log:
            LAYOUT.log(_probe, "merge", "{model}"),
        benchmark:
            LAYOUT.benchmark(_probe, "merge", "{model}")
        conda:
            ENV
        threads: 1
        resources:
            mem_mb=scaled(4000),
            runtime=scaled(30),
        params:
            probe=_probe,
            expect=lambda w, p=_probe: PLAN.config_hash(p, w.model),
            out_dir=lambda w, output: os.path.dirname(output[0]),  # LAYOUT.table_dir
        shell:
            "layerscope merge --probe {params.probe} --model {wildcards.model} --expect-hash {params.expect}"
            " --out-dir {params.out_dir} {input.shards} > {log} 2>&1"

    rule:
        name:
            f"{_probe}_figures"
        input:
            lambda w, p=_probe: [t for m in PLAN.models_of(p) for t in PLAN.table_paths(p, m)],
        output:
            # every figure of the plan (PNG in the report, PDF beside it): figure_outputs in common.smk
            figure_outputs(_probe),
        log:
            LAYOUT.log(_probe, "figures"),
        benchmark:
            LAYOUT.benchmark(_probe, "figures")
        conda:
            ENV
        threads: 1
        resources:
            mem_mb=scaled(4000),
            runtime=scaled(30),
        params:
            probe=_probe,
            out_dir=lambda w, output: os.path.dirname(output[0]),  # LAYOUT.figure_dir
            # the plot step writes exactly these figures (PNG + PDF each) or fails
            figures=",".join(PLAN.figure_names(_probe)),
            # sorted: reordering the probe's models: list reruns nothing
            tables=lambda w, p=_probe: [LAYOUT.table_dir(p, m) for m in sorted(PLAN.models_of(p))],
            # the study's name, not the config file's: a copy of the config reruns no figure
            caption=figure_caption(),
        shell:
            "layerscope plot --probe {params.probe} --out-dir {params.out_dir}"
            " --caption {params.caption:q} --figures {params.figures} {params.tables} > {log} 2>&1"
