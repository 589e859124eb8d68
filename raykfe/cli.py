"""``raykfe`` command line.

    raykfe prune -c jobs/digits.yaml [key=value ...]   run a whole job on Ray (joins RAY_ADDRESS or
                                                        --address, else starts a local cluster)
    raykfe config [-c JOB] [key=value ...]              print the resolved config (defaults filled in)
    raykfe sweep -c jobs/digits-sweep.yaml [key=value]  a sweep of targets / methods / fine-tuning on
                                                        Ray Tune, with the Pareto front
    raykfe widen -c jobs/digits.yaml [key=value ...]    widen the bottlenecks the job's plan flags (x widen.factor)
                                                        and, at the same MACs, every layer uniformly; train, prune
                                                        and fine-tune both like the base; compare (runs the job
                                                        first when its result is absent)
    raykfe report URI                                   print the report of a finished job, sweep or widening
    raykfe methods                                      list the pruning methods (prune.method)
    raykfe export URI --format pt2|torchscript|onnx --out FILE
                                                        the pruned (or --base) model of a result as a
                                                        self-contained TorchScript / ONNX file, checked

User errors print ``raykfe: error: <one line>`` and exit 2; nothing is written for a job that fails.
"""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["main"]


def _job_arguments(parser: argparse.ArgumentParser, config_help: str, overrides_help: str) -> None:
    """The arguments of a command that runs a job (``prune``, ``widen``): its YAML, overrides and
    where it runs."""
    parser.add_argument("-c", "--config", required=True, help=config_help)
    parser.add_argument("overrides", nargs="*", help=overrides_help)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else a new local one)")
    parser.add_argument("--local", action="store_true", help="run in this process without Ray (runtime=local)")
    parser.add_argument("--verbose", action="store_true", help="Ray's own log lines on the console too (ray.verbose=true)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raykfe", description="Second-order structured pruning (EigenDamage and its baselines).")
    sub = p.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("prune", help="run a pruning job from a YAML spec")
    _job_arguments(pr, "job YAML, e.g. jobs/digits.yaml", "key=value overrides, e.g. prune.target=flops:0.7")
    pr.add_argument("--layers", action="store_true", help="print the per-layer table however many layers there are")
    sw = sub.add_parser("sweep", help="sweep targets, methods and fine-tuning settings on Ray Tune")
    sw.add_argument("-c", "--config", required=True, help="sweep YAML, e.g. jobs/digits-sweep.yaml")
    sw.add_argument("overrides", nargs="*", help="key=value overrides, e.g. sweep.targets=[flops:0.5,flops:0.7]")
    sw.add_argument("--quiet", action="store_true", help="no progress output")
    sw.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else a new local one)")
    sw.add_argument("--verbose", action="store_true", help="Ray's own log lines on the console too (ray.verbose=true)")
    wi = sub.add_parser("widen", help="widen the bottlenecks a job's plan flags, compare with a uniform widening "
                        "of the same MACs, both pruned again")
    _job_arguments(wi, "job YAML, e.g. jobs/digits.yaml (its result is read, or made first)",
                   "key=value overrides, e.g. widen.factor=2 widen.uri=results/digits-widen")
    co = sub.add_parser("config", help="print the resolved job config")
    co.add_argument("-c", "--config", default=None)
    co.add_argument("overrides", nargs="*")
    pf = sub.add_parser("profile", help="measure (or complete) the latency table prune.forms=latency chooses forms by")
    pf.add_argument("-c", "--config", required=True, help="job YAML: its model, input size, device, latency.threads / batch / table")
    pf.add_argument("overrides", nargs="*", help="key=value overrides, e.g. latency.table=s3://bucket/raykfe/latency")
    pf.add_argument("--quiet", action="store_true", help="no progress bar")
    rp = sub.add_parser("report", help="print the report of a finished job")
    rp.add_argument("uri")
    sub.add_parser("methods", help="list the pruning methods (prune.method)")
    ex = sub.add_parser("export", help="export a result's pruned model as an ExportedProgram, TorchScript or ONNX "
                        "(runs without raykfe)")
    ex.add_argument("uri", help="a finished job result: local directory or s3:// / gs:// URI")
    ex.add_argument("--format", default=None, help="pt2 (torch.export, recommended), torchscript or onnx "
                    "(default: from --out's extension, .pt2 / .pt / .onnx)")
    ex.add_argument("--out", default=None, help="the file to write (its directory must exist), or an s3:// / gs:// object")
    ex.add_argument("--base", action="store_true", help="export the base (unpruned) model of the job instead")
    ex.add_argument("--input-shape", default=None, help="C,H,W without the batch, when the result records none")
    ex.add_argument("--force", action="store_true", help="replace --out if it exists")
    ex.add_argument("--no-fold-bn", dest="fold_bn", action="store_false",
                    help="keep BatchNorm layers (by default each one right after a conv is folded into it)")
    return p


def _config(args) -> int:
    import yaml

    from .config import config_to_dict, load_config

    print(yaml.safe_dump(config_to_dict(load_config(args.config, args.overrides)), sort_keys=False), end="")
    return 0


def _methods(args) -> int:
    from .methods import METHODS
    from .report import format_table

    rows = [[m.name, m.space, m.statistics, m.summary] for m in METHODS.values()]
    print(format_table(["method", "removes", "statistics", "what it does"], rows))
    return 0


def _print_sweep(uri: str, end: str = "") -> None:
    from .storage import open_uri

    loc = open_uri(uri)
    print(loc.read_bytes("trials.md").decode())
    print(loc.read_bytes("front.md").decode(), end=end)


def _report(args) -> int:
    from .checkpoint import read_file, read_manifest
    from .sweep import read_sweep

    if read_sweep(args.uri) is not None:
        _print_sweep(args.uri)
        return 0
    print(read_file(args.uri, "report.md", read_manifest(args.uri)).decode(), end="")
    return 0


def _export(args) -> int:
    from .export import export

    print(export(args.uri, args.out, args.format, base=args.base, input_shape=args.input_shape, force=args.force,
                 fold_bn=args.fold_bn).summary())
    return 0


def _overrides(args) -> list[str]:
    overrides = list(args.overrides) + (["progress=false"] if args.quiet else [])
    overrides += [f"ray.address={args.address}"] if getattr(args, "address", None) else []
    overrides += ["ray.verbose=true"] if getattr(args, "verbose", False) else []
    return overrides + (["runtime=local"] if getattr(args, "local", False) else [])


def _sweep(args) -> int:
    from .config import load_config
    from .sweep import run_sweep

    cfg = load_config(args.config, _overrides(args))
    summary = run_sweep(cfg, log=lambda m: print(m, file=sys.stderr))
    _print_sweep(cfg.output.uri, end="\n")
    print(f"{summary['done']} of {summary['trials']} trials finished ({summary['stopped']} stopped early by ASHA, "
          f"{summary['errors']} failed); front plot: {cfg.output.uri.rstrip('/')}/front.png")
    return 0


_LAYER_ROWS = 16  # longer per-layer tables are left to `raykfe report` unless --layers


def _prune(args) -> int:
    from .config import load_config
    from .pipeline import run_job
    from .report import job_table

    cfg = load_config(args.config, _overrides(args))
    backend = None
    if cfg.runtime == "ray":
        from .distributed.backend import RayBackend

        backend = RayBackend(cfg)
    job = run_job(cfg, backend, log=lambda m: print(m, file=sys.stderr))
    print(job_table(job.metrics))
    if job.result is not None:
        print()
        rows = job.result.report
        if args.layers or len(rows) <= _LAYER_ROWS:
            print(job.result.table())
        else:  # a long per-layer table drowns the summary above: it is in the report
            dense = sum(1 for r in rows if r.get("action") == "dense")
            bottlenecks = [r["layer"] for r in rows if "bottleneck" in str(r.get("note", ""))]
            print(f"per-layer plan: {len(rows)} layers ({dense} left dense)"
                  + (f", bottlenecks: {', '.join(bottlenecks)}" if bottlenecks else "")
                  + f"; the table: raykfe report {cfg.output.uri} (or prune --layers)")
    print(f"\nresult: {cfg.output.uri}")
    return 0


def _widen(args) -> int:
    from .config import load_config
    from .widen_job import comparison_table, run_widen, widen_uri

    cfg = load_config(args.config, _overrides(args))

    def backend_for(job_cfg):
        if job_cfg.runtime != "ray":
            return None
        from .distributed.backend import RayBackend

        return RayBackend(job_cfg)

    metrics = run_widen(cfg, backend_for, log=lambda m: print(m, file=sys.stderr))
    print(comparison_table(metrics))
    print(f"\nresult: {widen_uri(cfg)} (raykfe report {widen_uri(cfg)})")
    return 0


def _profile(args) -> int:
    from .config import load_config
    from .profile import profile_job

    cfg = load_config(args.config, _overrides(args))
    print(profile_job(cfg, log=lambda m: print(m, file=sys.stderr)))
    return 0


_COMMANDS = {"profile": _profile, "config": _config, "methods": _methods, "report": _report, "export": _export, "sweep": _sweep, "prune": _prune,
             "widen": _widen}


def _run(args) -> int:
    return _COMMANDS[args.command](args)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .errors import RaykfeError

    try:
        return _run(args)
    except RaykfeError as exc:
        print(f"raykfe: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("raykfe: interrupted; nothing was written for the unfinished job", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: one line for the user, the traceback on request
        if os.environ.get("RAYKFE_DEBUG"):
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        print(
            f"raykfe: internal error: {type(exc).__name__}: {first} (set RAYKFE_DEBUG=1 for the traceback and report it)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
