"""Command line of the pipeline: `python -m compendium run STAGE --profile NAME`, `check-params NAME`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from compendium import artifacts
from compendium.params import ParamsError, build_name, load_params, profile_path
from compendium.stages import ALL_STAGES, BUILD_ROOT, StageError, pipeline, run_stage


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compendium")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one stage for a profile")
    run.add_argument("stage", choices=list(ALL_STAGES))
    run.add_argument("--profile", default="default")
    run.add_argument("--build-root", type=Path, default=BUILD_ROOT, help="where build/<profile>/ lives")
    run.add_argument("--no-progress", action="store_true")
    run.add_argument("--data", type=Path, default=None,
                     help="a dataset YAML: run on provided data (see docs/bring_your_own_data.md)")
    check = sub.add_parser("check-params", help="validate a profile (and a dataset YAML) and exit")
    check.add_argument("profile")
    check.add_argument("--data", type=Path, default=None)
    stages = sub.add_parser("stages", help="list the stages in order")
    stages.add_argument("--data", type=Path, default=None)
    files = sub.add_parser("data-files", help="print the data files a dataset YAML reads (for make)")
    files.add_argument("data", type=Path)
    folder = sub.add_parser("build-name", help="print the build folder name of a profile (and dataset)")
    folder.add_argument("profile")
    folder.add_argument("--data", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        if args.command == "stages":
            print("\n".join(pipeline(args.data is not None)))
        elif args.command == "data-files":
            from data_synth.dataset import load_dataset

            print(" ".join(artifacts.relative(p) for p in load_dataset(args.data).input_files()))
        elif args.command == "build-name":
            print(build_name(args.profile, args.data))
        elif args.command == "check-params":
            profile = load_params(profile_path(args.profile), args.data)
            data = f", data {profile.data}" if profile.data else ""
            print(f"params/{args.profile}.yaml is valid: sites {list(profile.sites)}, seed {profile.seed}{data}")
        else:
            folder = run_stage(args.stage, args.profile, build_root=args.build_root, progress=not args.no_progress,
                               data_file=args.data)
            print(f"{args.stage}: artifacts in {folder}")
        return 0
    except (ParamsError, StageError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
