"""Command line of the pipeline: `python -m compendium run STAGE --profile NAME`, `check-params NAME`."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from compendium import artifacts
from compendium.params import ParamsError, build_name, load_params, profile_path
from compendium.stages import ALL_STAGES, BUILD_ROOT, DATA_CARD_STAGE, StageError, mermaid, pipeline, run_stage


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
    stages.add_argument("--mermaid", action="store_true", help="print the stage graph as a Mermaid flowchart")
    folder = sub.add_parser("build-name", help="print the build folder name of a profile (and dataset)")
    folder.add_argument("profile")
    folder.add_argument("--data", type=Path, default=None)
    rules = sub.add_parser("make-rules", help="write the make rules of every stage for a profile (the Makefile reads them)")
    rules.add_argument("--profile", required=True)
    rules.add_argument("--build-root", default="build")
    rules.add_argument("--data", default=None)
    rules.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "stages":
            print(mermaid() if args.mermaid else "\n".join(pipeline(args.data is not None)))
        elif args.command == "make-rules":
            from compendium.makerules import make_rules

            text = make_rules(args.profile, args.build_root, args.data)
            artifacts.atomic_write(args.output, lambda tmp: tmp.write_text(text))
        elif args.command == "build-name":
            print(build_name(args.profile, args.data))
        elif args.command == "check-params":
            profile = load_params(profile_path(args.profile), args.data)
            data = f", data {profile.data}" if profile.data else ""
            print(f"params/{args.profile}.yaml is valid: sites {list(profile.sites)}, seed {profile.seed}{data}")
        else:
            # Stage 1's name tells which pipeline it is; later stages sit at the same place in both.
            order = pipeline(provided=args.stage == DATA_CARD_STAGE)
            position = f"{order.index(args.stage) + 1}/{len(order)}"
            print(f"[{position}] {args.stage}: {ALL_STAGES[args.stage].title} ({args.profile} profile)", flush=True)
            started = time.perf_counter()
            folder = run_stage(args.stage, args.profile, build_root=args.build_root, progress=not args.no_progress,
                               data_file=args.data)
            print(f"[{position}] {args.stage}: done in {time.perf_counter() - started:.0f} s, "
                  f"artifacts in {artifacts.relative(folder)}", flush=True)
        return 0
    except (ParamsError, StageError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
