"""``layerscope`` command line: what the Snakemake rules call (rules stay thin).

    layerscope check-config config.yaml             validate and print the shard plan
    layerscope fetch config.real.yaml               download the study's hub models (login node)
    layerscope build-model --family F --arch A --seed S --out DIR
    layerscope dataset-index --name N --spec JSON --out INDEX.tsv
    layerscope dataset-slice --name N --spec JSON --max-images M --slice IofN --out INDEX.tsv
    layerscope run-shard --spec JSON --out SHARD.h5 [--shard LABEL] [--exec JSON]
                                                     one shard (spec as JSON text or @file)
    layerscope merge --probe P --model M [--expect-hash H] --out-dir DIR SHARD...
    layerscope plot --probe P --out-dir DIR [--figures F,...] TABLE_DIR...
    layerscope inspect SHARD.h5                      provenance of a shard
    layerscope textgrad --prompt P --image IMG --model DIR [--load-ckpt F] --out DIR
                                                     note 000's single-pair mode (SD3 text gradients)
    layerscope status [--config C] [--workdir D]     shards done / missing / refused, GPU hours

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


from layerscope.layout import user_error_marker  # noqa: E402,F401  (re-exported: the rules import it from here)


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
    elif kind == "usererror" and fnmatch.fnmatch(str(out), rest):
        from layerscope.errors import ConfigError

        raise ConfigError(f"config field probes: LAYERSCOPE_FAULT: injected user error in {out}")


def _run_probe_shard(probe: Any, spec: Any, writer: Any, out: Path) -> None:
    """Run the probe; an out-of-memory becomes one ResourceError line naming the shard, the memory
    asked for and what to change (a retry with more memory may help: ResourceError is retryable)."""
    from layerscope.errors import ResourceError

    try:
        probe.run_shard(spec, writer)
    except ResourceError:
        raise
    except MemoryError as e:
        raise ResourceError(_oom_message(spec, out, e)) from None
    except RuntimeError as e:
        if type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e).lower():
            raise ResourceError(_oom_message(spec, out, e)) from None
        raise


def _oom_message(spec: Any, out: Path, e: BaseException) -> str:
    import re

    first = (str(e).strip().splitlines() or [""])[0]
    m = re.search(r"(Tried to allocate [0-9.]+ [KMGT]?i?B)", first)
    asked = m.group(1) if m else (first[:120] or type(e).__name__)
    hint = ("set probes.%s.gradient_checkpointing: true, mixed_precision: bf16, optimizer: adamw8bit or mode: lora,"
            " or raise probes.%s.resources.mem_mb / use a larger GPU" % (spec.probe, spec.probe)
            if spec.probe == "sd3_recon_train" else
            "lower probes.%s.batch_size, set models.%s.dtype: bf16, or raise probes.%s.resources (mem_mb, gpu_model)"
            % (spec.probe, spec.model, spec.probe))
    return f"out of memory in shard {out} ({asked}): {hint}"


def cmd_run_shard(args: argparse.Namespace) -> None:
    # Shard jobs never use the network: hub models come from the local cache (`layerscope fetch`).
    # Set before huggingface_hub is imported (it reads this once); an explicit setting wins.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from layerscope.data import index_digest
    from layerscope.errors import USER_ERROR_CODES, ConfigError, LayerscopeError
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
    if args.exec:  # execution knobs (device, batch sizes the numbers do not depend on): outside the spec file
        ex = json.loads(args.exec)
        d["probe_cfg"] = {**d.get("probe_cfg", {}), **ex.get("probe_cfg", {})}
        if ex.get("device"):
            d["device"] = ex["device"]
    spec = ShardSpec.from_json_dict(d)
    # a shard job meeting bad settings (an old spec, a hand-edited one) names the field in one line
    get_probe(spec.probe).settings(spec.probe_cfg)
    set_threads(spec.threads)
    probe = get_probe(spec.probe)
    # the digest of the data this shard read: its own slice's index (shards of other slices differ)
    digests = {name: index_digest(spec.data_index()) for name in spec.datasets} if spec.datasets else {}
    prov = {
        "probe": spec.probe, "model": spec.model, "axes": spec.axes, "config_hash": spec.config_hash,
        "data_digest": json.dumps(digests, sort_keys=True), "spec": spec.to_json_dict(),
    }
    from layerscope.progress import set_current
    from layerscope.provenance import peak_memory_mb, reset_peak_memory, runtime_provenance

    rt = runtime_provenance(spec.device, spec.model_cfg)
    prov.update(rt)
    label = args.shard or Path(args.out).name.removesuffix(".h5")
    set_current(f"{spec.probe} {spec.model}/{label}")
    log.info("shard %s %s/%s on %s (%s, %s), torch %s, CUDA %s, code %s", spec.probe, spec.model, label,
             rt["device"], rt["gpu_name"], rt["dtype"], rt["torch_version"], rt["cuda_version"], rt["git_revision"])
    reset_peak_memory(rt["device"])
    t0 = time.perf_counter()
    out = Path(args.out)
    marker = user_error_marker(out)
    try:
        with ShardWriter(out, prov) as w:
            _run_probe_shard(probe, spec, w, out)
            _inject_fault(out)
            w.set_attr("seconds", time.perf_counter() - t0)
            w.set_attr("peak_accelerator_mem_mb", peak_memory_mb(rt["device"]))
    except LayerscopeError as e:
        if marker and e.exit_code in USER_ERROR_CODES:  # a retry at doubled resources cannot help: say so
            Path(marker).parent.mkdir(parents=True, exist_ok=True)
            Path(marker).write_text(f"{e}\n")
        raise
    finally:
        set_current("")
    if marker:
        Path(marker).unlink(missing_ok=True)
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

    for p in plot_from_tables(args.probe, args.table_dirs, args.out_dir, args.caption, args.figures):
        log.info("wrote %s", p)


def cmd_build_model(args: argparse.Namespace) -> None:
    from layerscope.errors import ConfigError
    from layerscope.models import FAMILIES, build_tiny, set_threads
    from layerscope.settings import NAME_RE

    if args.family not in FAMILIES:
        raise ConfigError(f"--family: unknown model family {args.family!r}; known: {', '.join(sorted(FAMILIES))}")
    if not NAME_RE.match(args.arch):
        raise ConfigError(f"--arch: {args.arch!r} is not a tiny architecture name")

    set_threads(1)
    build_tiny(args.family, args.arch, args.seed, args.out)
    log.info("built tiny %s/%s (seed %d) at %s", args.family, args.arch, args.seed, args.out)


def cmd_dataset_index(args: argparse.Namespace) -> None:
    from layerscope.data import build_index

    build_index(args.name, _load_spec(args.spec), args.out)


def cmd_dataset_slice(args: argparse.Namespace) -> None:
    from layerscope.data import build_slice

    build_slice(args.name, _load_spec(args.spec), args.max_images, args.slice, args.out)


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


def cmd_textgrad(args: argparse.Namespace) -> None:
    from layerscope.models import set_threads
    from layerscope.textgrad_pair import run_pair

    set_threads(args.threads)
    cfg: dict[str, Any] = {"topk": args.topk, "max_sequence_length": args.max_sequence_length,
                           "ignore_padding": args.ignore_padding, "force_txt_grad": args.force_txt_grad,
                           "timestep_convention": args.timestep_convention, "image_size": args.image_size,
                           "batch_size": int(args.batch_size) if args.batch_size != "auto" else "auto",
                           "memory_budget_mb": args.memory_budget_mb}
    if args.layers:
        cfg["layers"] = args.layers
    out = run_pair(args.model, args.prompt, args.image, args.out, timesteps=args.timesteps, seeds=args.seeds,
                   checkpoint=args.load_ckpt, lora=args.lora, dtype=args.precision, device=args.device, probe_cfg=cfg)
    for p in [*out["tables"], *out["figures"]]:
        log.info("wrote %s", p)


def cmd_status(args: argparse.Namespace) -> None:
    from layerscope.plan import plan_from_file
    from layerscope.status import format_status, study_status

    wd = Path(args.workdir)
    config = args.config or str(wd / "config.yaml")
    plan = plan_from_file(config, wd)
    print(format_status(study_status(plan, wd)))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="layerscope", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("run-shard", help="compute one shard")
    s.add_argument("--spec", required=True, help="shard spec as JSON text or @file")
    s.add_argument("--shard", default=None, help="shard label (axis-value__...): completes a base spec")
    s.add_argument("--out", required=True)
    s.add_argument("--threads", type=int, default=0)
    s.add_argument("--exec", default=None, help="execution settings as JSON: device, probe settings the numbers do not depend on")
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
    s.add_argument("--figures", type=lambda v: [f for f in v.split(",") if f], help="F,G,...: write exactly these figures")
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

    s = sub.add_parser("dataset-slice", help="write one data slice's index TSV (items chosen by a stable key)")
    s.add_argument("--name", required=True)
    s.add_argument("--spec", required=True)
    s.add_argument("--max-images", type=int, default=0)
    s.add_argument("--slice", required=True, help="IofN")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_dataset_slice)

    s = sub.add_parser("check-config", help="validate a config and print its shard plan")
    s.add_argument("config")
    s.set_defaults(func=cmd_check_config)

    s = sub.add_parser("status", help="shards done / missing / refused and GPU hours, per probe and model")
    s.add_argument("--config", default=None, help="the study's config (default: <workdir>/config.yaml)")
    s.add_argument("--workdir", default=".", help="the study's working directory (where results/<study>/ is)")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("fetch", help="download every hub model of a study (login node; only the files the loaders read)")
    s.add_argument("config")
    s.add_argument("--dry-run", action="store_true", help="list what would be fetched")
    s.set_defaults(func=cmd_fetch)

    s = sub.add_parser("inspect", help="print a shard's provenance")
    s.add_argument("shard")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("textgrad", help="SD3 text-gradient sensitivity of one prompt + image (design note 000's single-pair mode)")
    s.add_argument("--prompt", required=True)
    s.add_argument("--image", required=True)
    s.add_argument("--model", required=True, help="SD3 pipeline folder (save_pretrained layout) or hub:<id>")
    s.add_argument("--load-ckpt", default=None, help="fine-tuned transformer state dict or LoRA file (.safetensors/.pt/.bin)")
    s.add_argument("--lora", default=None, help="peft adapter folder")
    s.add_argument("--timesteps", type=int, nargs="+", default=[500], help="in --timestep-convention (default note: sigma = t/1000)")
    s.add_argument("--timestep-convention", choices=["note", "schedule_index"], default="note")
    s.add_argument("--seeds", type=int, nargs="+", default=[0])
    s.add_argument("--layers", type=int, nargs="+", default=None, help="0-based transformer_blocks (default: all)")
    s.add_argument("--topk", type=int, default=10)
    s.add_argument("--max-sequence-length", type=int, default=256)
    s.add_argument("--image-size", type=int, default=0)
    s.add_argument("--ignore-padding", action=argparse.BooleanOptionalAction, default=False,
                   help="exclude padding positions from the metrics (off by default, as in the note's script)")
    s.add_argument("--force-txt-grad", action=argparse.BooleanOptionalAction, default=True)
    s.add_argument("--precision", choices=["auto", "fp16", "bf16", "fp32"], default="fp32")
    s.add_argument("--device", default="auto")
    s.add_argument("--batch-size", default="auto", help="samples per forward+backward, or auto (from --memory-budget-mb)")
    s.add_argument("--memory-budget-mb", type=float, default=4096)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--out", required=True, help="output folder: shards/, tables/, figures/")
    s.set_defaults(func=cmd_textgrad)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None and os.environ.get("LAYERSCOPE_FORKSERVER"):  # local runs: skip the heavy imports
        from layerscope.forkserver import try_forward

        rc = try_forward(sys.argv[1:])
        if rc is not None:
            return rc
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
