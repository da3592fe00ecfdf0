"""layerscope: layer-by-layer probes of text conditioning and attention in diffusion and vision
transformers, run as a sharded Snakemake study (models -> probes -> stats -> merge -> plots)."""

__version__ = "0.1.0"
