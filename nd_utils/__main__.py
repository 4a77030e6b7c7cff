"""Command line: `python -m nd_utils run CONFIG [--set key=value ...] [--stages 01,02] [--force]`."""
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
    sub.add_parser("profiles", help="list the config profiles")
    args = parser.parse_args(argv)

    from .runner import run_pipeline

    try:
        if args.command == "profiles":
            from .config import list_profiles
            print("\n".join(list_profiles()))
            return 0
        result = run_pipeline(args.config, args.overrides, args.stages, args.force,
                              log=lambda *a, **k: print(*a, file=sys.stderr, **k))
    except NdUtilsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"run folder: {result.path}", file=sys.stderr)
    print(result.results)  # last line: the results folder (make demo relies on it)
    return 0


if __name__ == "__main__":
    sys.exit(main())
