# layerscope: layer-by-layer probes of diffusion and vision transformers.
#   snakemake -n                       plan (dry run: the job table per rule)
#   snakemake --profile profiles/local run here;  snakemake --profile slurm  on the cluster
#   snakemake --forcerun <shard.h5>    rerun one shard and what depends on it
# Top level stays light: every SLURM job re-reads this file, so no torch import or model loading here.
from snakemake.utils import min_version

min_version("9.0")


# config.yaml is the default study; `--configfile other.yaml` replaces it (not a merge), so a
# real-model study never inherits the tiny default's probes.
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/inputs.smk"
include: "workflow/rules/probes.smk"


rule all:
    default_target: True
    input:
        PLAN.targets(),
        # the tables too: as mere intermediates of newer figures, missing tables would not be rebuilt
        all_tables(),


# The run's console summary: non-finite activations counted in any table (the merge's warning
# goes to its log only, which Snakemake does not show).
onsuccess:
    print_nonfinite_summary()


onerror:
    print_nonfinite_summary()
