"""Command line: `python -m nd_utils run CONFIG [--set key=value ...] [--stages 01,02] [--force]
[--executor ray [--address auto]]`.

`python -m nd_utils report RUN [--out DIR]` writes a static HTML report of a run folder
(`run ... --report` writes it at the end of the run, in the same process).
`python -m nd_utils figures RUN [--out DIR]` regenerates figures/ (PNG, PDF, JSON) from a run.
"""
from __future__ import annotations

import argparse
import sys

from .errors import NdUtilsError


def main(argv: "list[str] | None" = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nd_utils", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the stage notebooks with papermill into a run folder")
    run.add_argument("config", help="profile name (offline, paper) or path of a YAML config")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="dotted override, e.g. --set target.layers=[layer4] (repeatable)")
    run.add_argument("--stages", default=None, help="comma-separated stage numbers, e.g. 01,02")
    run.add_argument("--force", action="store_true", help="recompute cached stage outputs")
    run.add_argument("--report", action="store_true",
                     help="write the HTML report of the run when it succeeds (RUN/report)")
    run.add_argument("--cold-kernels", action="store_true",
                     help="start each stage's kernel only when the stage starts (by default the "
                          "next stage's kernel starts, and imports nd_utils, during this one)")
    run.add_argument("--executor", choices=["local", "ray"], default=None,
                     help="where units of work run: local (in-process, the default) or ray "
                          "(Ray tasks; sets executor.name); results are the same")
    run.add_argument("--address", default=None, metavar="ADDR",
                     help="with --executor ray: a running cluster (auto, HOST:PORT or "
                          "ray://HOST:10001); default: a local instance for this run")
    run.add_argument("--num-cpus", type=int, default=None, metavar="N",
                     help="with --executor ray and no --address: CPUs of the local instance")
    sub.add_parser("profiles", help="list the config profiles")
    rep = sub.add_parser("report", help="write a static HTML report of a run folder")
    rep.add_argument("run", help="run folder path, or 'latest' (newest under data/runs)")
    rep.add_argument("--out", default=None, metavar="DIR",
                     help="report folder (default RUN/report)")
    figs = sub.add_parser("figures", help="regenerate figures/ (PNG + PDF + JSON provenance) "
                                          "from a run folder")
    figs.add_argument("run", help="run folder path, or 'latest' (newest under data/runs)")
    figs.add_argument("--out", default=None, metavar="DIR",
                      help="figure folder (default: figures/ of the repository)")
    args = parser.parse_args(argv)

    from .pipeline import executor_overrides, run_pipeline

    try:
        if args.command == "profiles":
            from .config import list_profiles
            print("\n".join(list_profiles()))
            return 0
        if args.command == "figures":
            from .viz.figures import write_figures
            done = write_figures(args.run, args.out,
                                 log=lambda *a: print(*a, file=sys.stderr, flush=True))
            print(done.out)  # last line: the figure folder
            return 0
        if args.command == "report":
            from .viz.report import write_report
            path = write_report(args.run, args.out)
            print(path)  # last line: the report's index.html
            return 0
        if (args.address or args.num_cpus) and args.executor != "ray":
            raise NdUtilsError("--address and --num-cpus go with --executor ray")
        overrides = args.overrides + executor_overrides(args.executor, args.address,
                                                        args.num_cpus)
        result = run_pipeline(args.config, overrides, args.stages, args.force,
                              log=lambda *a, **k: print(*a, file=sys.stderr, **k),
                              warm_kernels=not args.cold_kernels)
        if args.report:
            from .viz.report import write_report
            print(f"report: {write_report(result.path)}", file=sys.stderr)
    except NdUtilsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:  # run.json already says "interrupted"; caches resume
        how = f"terminated by {exc}" if hasattr(exc, "exit_code") else "interrupted"
        print(f"{how}: rerun the same command to resume from the cached stages",
              file=sys.stderr)
        return getattr(exc, "exit_code", 130)   # 143 after SIGTERM, 129 after SIGHUP
    print(f"run folder: {result.path}", file=sys.stderr)
    print(result.results)  # last line: the results folder (make demo relies on it)
    return 0


if __name__ == "__main__":
    sys.exit(main())
