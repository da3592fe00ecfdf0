"""``layerscope`` command line: what the Snakemake rules call (rules stay thin).

    layerscope check-config config.yaml             validate and print the shard plan
    layerscope fetch config.real.yaml               download the study's hub models (login node)
    layerscope build-model --family F --arch A --seed S --out DIR
    layerscope dataset-index --name N --spec JSON --out results/data/N/index.tsv
    layerscope run-shard --spec JSON --out SHARD.h5  one shard (spec as JSON text or @file)
    layerscope merge --probe P --model M [--expect-hash H] --out-dir DIR SHARD...
    layerscope plot --probe P --out-dir DIR TABLE_DIR...
    layerscope inspect SHARD.h5                      provenance of a shard

Errors a user can fix (config, paths, weights, data, bad shards) print as ``layerscope: error: ...``
naming the field or file, and exit with status 2.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger("layerscope")


def _load_spec(text: str) -> dict[str, Any]:
    if text.startswith("@"):
        text = Path(text[1:]).read_text()
    return json.loads(text)


def _inject_fault(out: Path) -> None:
    """Fault injection for tests of the cluster path, through the environment (no code edits):
    LAYERSCOPE_FAULT='fail:<glob>' fails matching shards mid-write; 'sleep:<sec>:<glob>' stalls them."""
    fault = os.environ.get("LAYERSCOPE_FAULT", "")
    if not fault:
        return
    kind, _, rest = fault.partition(":")
    if kind == "sleep":
        secs, _, pattern = rest.partition(":")
        if fnmatch.fnmatch(str(out), pattern):
            log.warning("LAYERSCOPE_FAULT: sleeping %s s in %s", secs, out)
            time.sleep(float(secs))
    elif kind == "fail" and fnmatch.fnmatch(str(out), rest):
        raise RuntimeError(f"LAYERSCOPE_FAULT: injected failure in {out}")


def cmd_run_shard(args: argparse.Namespace) -> None:
    # Shard jobs never use the network: hub models come from the local cache (`layerscope fetch`).
    # Set before huggingface_hub is imported (it reads this once); an explicit setting wins.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from layerscope.data import index_digest
    from layerscope.errors import ConfigError
    from layerscope.h5io import ShardWriter
    from layerscope.models import set_threads
    from layerscope.probes import get_probe
    from layerscope.probes.base import ShardSpec

    d = _load_spec(args.spec)
    if args.shard:  # a (probe, model) base spec plus this shard's label (its file name)
        from layerscope.plan import parse_shard_label

        try:
            d["axes"] = parse_shard_label(args.shard, get_probe(d["probe"]).axes)
        except ValueError as e:
            raise ConfigError(f"--shard: {e}") from None
    if args.threads:
        d["threads"] = args.threads
    spec = ShardSpec.from_json_dict(d)
    set_threads(spec.threads)
    probe = get_probe(spec.probe)
    digests = {name: index_digest(d["index"]) for name, d in spec.datasets.items() if d.get("index")}
    prov = {
        "probe": spec.probe, "model": spec.model, "axes": spec.axes, "config_hash": spec.config_hash,
        "data_digest": json.dumps(digests, sort_keys=True), "spec": spec.to_json_dict(),
    }
    t0 = time.perf_counter()
    out = Path(args.out)
    with ShardWriter(out, prov) as w:
        probe.run_shard(spec, w)
        _inject_fault(out)
        w.set_attr("seconds", time.perf_counter() - t0)
    log.info("wrote %s in %.1f s", out, time.perf_counter() - t0)


def cmd_write_spec(args: argparse.Namespace) -> None:
    from layerscope.h5io import atomic_path
    from layerscope.probes.base import ShardSpec

    d = _load_spec(args.spec)
    ShardSpec.from_json_dict(d)  # refuse a malformed spec here, not in every shard
    with atomic_path(args.out) as tmp:
        tmp.write_text(json.dumps(d, indent=1, sort_keys=True) + "\n")


def cmd_merge(args: argparse.Namespace) -> None:
    from layerscope.merge import merge_to_tables

    paths = list(args.shards)
    if args.shard_list:
        paths += [ln for ln in Path(args.shard_list).read_text().split() if ln]
    for p in merge_to_tables(args.probe, args.model, paths, args.out_dir, args.expect_hash):
        log.info("wrote %s", p)


def cmd_plot(args: argparse.Namespace) -> None:
    from layerscope.merge import plot_from_tables

    for p in plot_from_tables(args.probe, args.table_dirs, args.out_dir, args.caption):
        log.info("wrote %s", p)


def cmd_build_model(args: argparse.Namespace) -> None:
    from layerscope.models import build_tiny, set_threads

    set_threads(1)
    build_tiny(args.family, args.arch, args.seed, args.out)
    log.info("built tiny %s/%s (seed %d) at %s", args.family, args.arch, args.seed, args.out)


def cmd_dataset_index(args: argparse.Namespace) -> None:
    from layerscope.data import build_index

    build_index(args.name, _load_spec(args.spec), args.out)


def cmd_check_config(args: argparse.Namespace) -> None:
    from layerscope.estimate import format_estimates
    from layerscope.plan import plan_from_file

    plan = plan_from_file(args.config)
    print(plan.summary())
    print("expected peak accelerator memory of one shard:")
    print(format_estimates(plan))


def cmd_fetch(args: argparse.Namespace) -> None:
    """Download every hub model of a study into the hub cache (a login node with network)."""
    from layerscope.hub import fetch_models, hub_cache_dir
    from layerscope.plan import load_config, validate_config

    cfg = load_config(args.config)
    validate_config(cfg)
    done = fetch_models(cfg, dry_run=args.dry_run)
    print(f"{'would fetch' if args.dry_run else 'fetched'} {len(done)} hub model(s) into {hub_cache_dir()}")


def cmd_inspect(args: argparse.Namespace) -> None:
    from layerscope.h5io import Shard

    sh = Shard(args.shard)
    for k in sorted(sh.attrs):
        v = sh.attrs[k]
        print(f"{k}: {v if len(str(v)) < 300 else str(v)[:300] + '...'}")
    print(f"groups: {len(sh.groups)}")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="layerscope", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("run-shard", help="compute one shard")
    s.add_argument("--spec", required=True, help="shard spec as JSON text or @file")
    s.add_argument("--shard", default=None, help="shard label (axis-value__...): completes a base spec")
    s.add_argument("--out", required=True)
    s.add_argument("--threads", type=int, default=0)
    s.set_defaults(func=cmd_run_shard)

    s = sub.add_parser("write-spec", help="write a (probe, model) base spec file")
    s.add_argument("--spec", required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_write_spec)

    s = sub.add_parser("merge", help="merge one (probe, model)'s shards into tables")
    s.add_argument("--probe", required=True)
    s.add_argument("--model", required=True)
    s.add_argument("--expect-hash", default=None)
    s.add_argument("--out-dir", required=True)
    s.add_argument("--shard-list", default=None, help="file listing shard paths (for very many shards)")
    s.add_argument("shards", nargs="*")
    s.set_defaults(func=cmd_merge)

    s = sub.add_parser("plot", help="figures from merged tables")
    s.add_argument("--probe", required=True)
    s.add_argument("--out-dir", required=True)
    s.add_argument("--caption", default="")
    s.add_argument("table_dirs", nargs="+")
    s.set_defaults(func=cmd_plot)

    s = sub.add_parser("build-model", help="build and save a tiny model")
    s.add_argument("--family", required=True)
    s.add_argument("--arch", default="default")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_build_model)

    s = sub.add_parser("dataset-index", help="write a dataset's index TSV")
    s.add_argument("--name", required=True)
    s.add_argument("--spec", required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_dataset_index)

    s = sub.add_parser("check-config", help="validate a config and print its shard plan")
    s.add_argument("config")
    s.set_defaults(func=cmd_check_config)

    s = sub.add_parser("fetch", help="download every hub model of a study (login node; only the files the loaders read)")
    s.add_argument("config")
    s.add_argument("--dry-run", action="store_true", help="list what would be fetched")
    s.set_defaults(func=cmd_fetch)

    s = sub.add_parser("inspect", help="print a shard's provenance")
    s.add_argument("shard")
    s.set_defaults(func=cmd_inspect)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from layerscope.errors import LayerscopeError

    try:
        args.func(args)
    except LayerscopeError as e:
        print(f"layerscope: error: {e}", file=sys.stderr)
        return e.exit_code
    except FileNotFoundError as e:
        print(f"layerscope: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
