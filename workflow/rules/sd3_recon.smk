# sd3_recon_train's shard jobs write two things: the shard (losses) and the trained checkpoint
#   <checkpoint_root>/<model>/<shard>/      (default root results/sd3_recon/checkpoints)
# which other probes load as a model (`source:` for mode full, `lora:` for mode lora). The generic
# <probe>_shard rule declares only the .h5, so this rule re-declares the job with the checkpoint
# directory as a second output, and `ruleorder` makes Snakemake pick it. Include after probes.smk.

if "sd3_recon_train" in PLAN.probes:
    _RECON_ROOT = config["probes"]["sd3_recon_train"].get("checkpoint_root", "results/sd3_recon/checkpoints").rstrip("/")

    rule sd3_recon_train_shard_checkpoint:
        input:
            lambda w: PLAN.shard_inputs("sd3_recon_train", w.model),
        output:
            shard="results/sd3_recon_train/shards/{model}/{shard}.h5",
            checkpoint=directory(f"{_RECON_ROOT}/{{model}}/{{shard}}"),
        params:
            spec=lambda w: PLAN.spec_json("sd3_recon_train", w.model, w.shard),
        log:
            "results/logs/sd3_recon_train/shards/{model}/{shard}.log",
        threads: PLAN.threads("sd3_recon_train")
        resources:
            **probe_resources("sd3_recon_train", 1),
        conda:
            ENV
        shell:
            LAYERSCOPE + " run-shard --spec {params.spec:q} --out {output.shard} > {log} 2>&1"

    ruleorder: sd3_recon_train_shard_checkpoint > sd3_recon_train_shard
