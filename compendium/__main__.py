"""Command line of the pipeline: `python -m compendium run STAGE --profile NAME`, `check-params NAME`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from compendium.params import ParamsError, load_params, profile_path
from compendium.stages import BUILD_ROOT, STAGES, StageError, run_stage


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compendium")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one stage for a profile")
    run.add_argument("stage", choices=list(STAGES))
    run.add_argument("--profile", default="default")
    run.add_argument("--build-root", type=Path, default=BUILD_ROOT, help="where build/<profile>/ lives")
    run.add_argument("--no-progress", action="store_true")
    check = sub.add_parser("check-params", help="validate a profile and exit")
    check.add_argument("profile")
    sub.add_parser("stages", help="list the stages in order")
    args = parser.parse_args(argv)
    try:
        if args.command == "stages":
            print("\n".join(STAGES))
        elif args.command == "check-params":
            profile = load_params(profile_path(args.profile))
            print(f"params/{args.profile}.yaml is valid: sites {list(profile.sites)}, seed {profile.seed}")
        else:
            folder = run_stage(args.stage, args.profile, build_root=args.build_root, progress=not args.no_progress)
            print(f"{args.stage}: artifacts in {folder}")
        return 0
    except (ParamsError, StageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
