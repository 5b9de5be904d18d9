"""`python -m report site --profile NAME [--build-root build]`: write the reviewer site;
`python -m report scan --profile NAME`: run the leak scan over every rendered page and PDF."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from report.leakscan import scan_tree
from report.site import build_site


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m report")
    parser.add_argument("command", choices=["site", "scan"])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--build-root", type=Path, default=Path("build"))
    parser.add_argument("--data", default=None, help="the dataset YAML of a provided-data build")
    args = parser.parse_args(argv)
    from compendium.params import build_name

    profile_dir = args.build_root / build_name(args.profile, args.data)
    try:
        if args.command == "site":
            print(f"reviewer site: {build_site(profile_dir, args.profile, args.data)}")
            return 0
        findings = scan_tree(profile_dir)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for finding in findings:
        print(f"leak: {finding}", file=sys.stderr)
    print(f"leak scan of {profile_dir}: {len(findings)} finding(s)")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
