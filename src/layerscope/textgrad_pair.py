"""``layerscope textgrad``: design note 000's single-pair mode, run on the probe's own code.

It sits above the merge (it writes shards, merges and plots them), so it lives beside the CLI, not in
the probe package: probes never import the merge or the planner.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from layerscope.layout import pair_dirs
from layerscope.probes.base import ShardSpec
from layerscope.probes.sd3_textgrad import SD3TextGrad
from layerscope.probes.textgrad_compute import Sample, compute_samples, resolve_timestep


def run_pair(model: str, prompt: str, image: str | Path, out_dir: str | Path, *, timesteps: Sequence[int] = (500,),
             seeds: Sequence[int] = (0,), checkpoint: str | None = None, lora: str | None = None, dtype: str = "fp32",
             device: str = "auto", probe_cfg: Mapping[str, Any] | None = None) -> dict[str, list[Path]]:
    """The note script's single-pair mode (``--prompt`` / ``--image`` / ``--load-ckpt``) on the probe's code.

    Every (timestep, seed) of the pair runs in batches (one forward and one backward per batch);
    the results are written as the study writes them, one shard per (timestep, seed) under
    ``out_dir/shards/<model>/``, merged into ``out_dir/tables/<model>/*.csv`` (samples, blocks,
    pooled, tokens) and drawn into ``out_dir/figures/``.  ``model`` is a local pipeline folder or
    ``hub:<id>``; ``checkpoint`` a transformer state dict or LoRA file, ``lora`` a peft adapter folder.
    """
    import hashlib
    import json

    from layerscope.data import Record
    from layerscope.errors import ConfigError, DataError, ModelLoadError
    from layerscope.h5io import ShardWriter
    from layerscope.merge import merge_to_tables, plot_from_tables
    from layerscope.plan import shard_label

    out_dir = Path(out_dir)
    if not prompt.strip():
        raise ConfigError("--prompt: empty prompt")
    if not Path(image).is_file():
        raise DataError(f"--image: image file not found: {image}")
    if len(set(timesteps)) != len(timesteps) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--timesteps / --seeds: duplicate values ({list(timesteps)}, {list(seeds)})")
    name = "model"
    if model.startswith("hub:"):
        mcfg: dict[str, Any] = {"kind": "hub", "hub_id": model[4:]}
    else:
        if not Path(model).exists():
            raise ModelLoadError(f"--model: model files not found: {model}")
        mcfg = {"kind": "path", "path": str(model)}
        name = Path(model).name or name
    for key, value, flag in (("checkpoint", checkpoint, "--load-ckpt"), ("lora", lora, "--lora")):
        if value:
            if not Path(value).exists():
                raise ModelLoadError(f"{flag}: file not found: {value}")
            mcfg[key] = str(value)
    mcfg.update(family="sd3", dtype=dtype, name=name)
    pcfg = {"models": [name], "dataset": "pair", "timesteps": list(timesteps), "seeds": list(seeds), "slices": 1,
            **dict(probe_cfg or {})}
    probe = SD3TextGrad()
    probe.check_config(pcfg, {})
    pipe, sch, st = probe.setup(mcfg, pcfg, device, name)
    rec = Record(0, str(Path(image).resolve()), prompt)
    conv = probe.settings(pcfg).timestep_convention  # the schema's default unless given
    samples = [Sample(rec, int(t), *resolve_timestep(int(t), conv, sch), int(s)) for t in timesteps for s in seeds]
    res = compute_samples(pipe, samples, st, log=logging.getLogger("layerscope.sd3_textgrad"))
    digest = hashlib.sha256(json.dumps([mcfg, pcfg, prompt, rec.path], sort_keys=True).encode()).hexdigest()[:16]
    dirs = pair_dirs(out_dir, name)
    shard_dir = Path(dirs["shards"])
    shard_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for t in timesteps:
        for s in seeds:
            axes = {"timestep": str(t), "seed": str(s), "slice": "0of1"}
            spec = ShardSpec(probe=probe.name, model=name, axes=axes, probe_cfg=pcfg, model_cfg=mcfg, config_hash=digest,
                             device=device)
            prov = {"probe": probe.name, "model": name, "axes": axes, "config_hash": digest,
                    "data_digest": json.dumps({"prompt": prompt, "image": rec.path}), "spec": spec.to_json_dict()}
            idx = np.array([i for i, smp in enumerate(samples) if smp.timestep == int(t) and smp.seed == int(s)])
            path = shard_dir / f"{shard_label(axes)}.h5"
            with ShardWriter(path, prov) as w:
                probe.write_results(w, pipe, sch, st, pcfg, mcfg, name, samples, res, idx)
            paths.append(path)
    tables = merge_to_tables(probe.name, name, paths, dirs["tables"], expect_hash=digest)
    figures = plot_from_tables(probe.name, [dirs["tables"]], dirs["figures"],
                               caption=f"(one pair: {prompt[:40]!r})")
    return {"shards": paths, "tables": tables, "figures": figures}
