"""Command line: `python -m data_synth generate ...` and `python -m data_synth cohort DIR`."""
from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

from data_synth.cohort import CohortSpec, write_cohort
from data_synth.generator import generate_site
from data_synth.omop import OmopValidationError
from data_synth.sites import SITE_NAMES, site_profile


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not an ISO date (YYYY-MM-DD): {text!r}") from error


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_synth", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="write one site's synthetic OMOP tables")
    generate.add_argument("--site", required=True, choices=SITE_NAMES)
    generate.add_argument("--patients", required=True, type=int)
    generate.add_argument("--seed", required=True, type=int)
    generate.add_argument("--out", required=True, type=Path, help="site folder; tables go to OUT/omop/")
    generate.add_argument("--cohort", action="store_true", help="also build OUT/cohort.parquet")
    cohort = commands.add_parser("cohort", help="build cohort.parquet from an OMOP folder")
    cohort.add_argument("dir", type=Path, help="a site folder holding omop/, or the OMOP folder itself")
    cohort.add_argument("--site", help="site name written in the cohort (default: the folder name)")
    cohort.add_argument("--seed", type=int, default=0, help="seed of the train/test split")
    cohort.add_argument("--test-fraction", type=float, default=0.3)
    cohort.add_argument("--study-start", type=_date, default=CohortSpec.study_start)
    cohort.add_argument("--study-end", type=_date, default=CohortSpec.study_end)
    cohort.add_argument("--followup-end", type=_date, default=CohortSpec.followup_end)
    for command in (generate, cohort):
        command.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "generate":
            profile = site_profile(args.site, {"patients": args.patients})
            omop_dir = generate_site(profile, args.seed, args.out, progress=not args.quiet)
            print(f"wrote {omop_dir}")
            if args.cohort:
                path, attrition = write_cohort(omop_dir, args.out, CohortSpec(seed=args.seed), args.site,
                                               progress=not args.quiet)
                print(f"wrote {path}: {attrition.cohort} index stays, {attrition.readmitted_30d} readmitted")
            return 0
        omop_dir = args.dir / "omop" if (args.dir / "omop").is_dir() else args.dir
        out_dir = args.dir if omop_dir != args.dir else args.dir.parent
        spec = CohortSpec(study_start=args.study_start, study_end=args.study_end,
                          followup_end=args.followup_end, test_fraction=args.test_fraction, seed=args.seed)
        path, attrition = write_cohort(omop_dir, out_dir, spec, args.site or out_dir.name, progress=not args.quiet)
        print(f"wrote {path}: {attrition.cohort} index stays, {attrition.readmitted_30d} readmitted")
        return 0
    except (OmopValidationError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
