"""The reviewer site: build/<profile>/site/index.html linking everything a reviewer reads.

Links are relative, so the site works opened from disk (file://) and served.
Written to a staging folder and renamed into place.
"""
from __future__ import annotations

import html
import json
import shutil
import tempfile
from pathlib import Path

import yaml

from compendium.artifacts import replace_folder
from compendium.params import profile_path
from compendium.stages import ALL_STAGES

REPORT_STAGE = "05_report"


def _link(href: str, text: str) -> str:
    return f'<li><a href="{html.escape(href)}">{html.escape(text)}</a></li>'


def build_site(profile_dir: Path, profile: str, data: str | None = None) -> Path:
    """Write site/index.html (and a copy of the parameters) under profile_dir; return the index path.

    `data` is the provided dataset YAML the build ran on (None: synthetic data).
    """
    profile_dir = Path(profile_dir)
    card = "01_data_card" if (profile_dir / "01_data_card").is_dir() else "01_synthetic_ehr"
    make = f"make all PROFILE={profile}" + (f" DATA={data}" if data else "")
    data_note = (f"Provided data{f' ({html.escape(str(data))})' if data else ''}; everything here was produced by"
                 if card == "01_data_card"
                 else "Synthetic data only; everything here was produced by")
    report = profile_dir / REPORT_STAGE
    if not (report / "pilot_report.html").is_file():
        raise FileNotFoundError(f"{report / 'pilot_report.html'} is missing: run `make all PROFILE={profile}`")
    staging = Path(tempfile.mkdtemp(prefix=".site-", dir=profile_dir))
    try:
        shutil.copyfile(profile_path(profile), staging / "parameters.yaml")
        items = {
            "Pilot report": [
                _link(f"../{REPORT_STAGE}/pilot_report.html", "Pilot report (HTML, English)"),
                _link(f"../{REPORT_STAGE}/pilot_report.pdf", "Pilot report (PDF, English)"),
                _link(f"../{REPORT_STAGE}/pilot_report.sv.html", "Pilotrapport (HTML, svenska)"),
                _link(f"../{REPORT_STAGE}/pilot_report.sv.pdf", "Pilotrapport (PDF, svenska)"),
            ],
            "Rendered notebooks": [
                _link(f"../notebooks/{name}.html", f"{name}: {stage.title}")
                for name, stage in ALL_STAGES.items() if (profile_dir / "notebooks" / f"{name}.html").is_file()
            ],
            "Data card": [_link(f"../notebooks/{card}.html", "Data card (stage 1 notebook)")],
            "Parameters and provenance": [_link("parameters.yaml", f"Parameters: params/{profile}.yaml")] + [
                _link(f"../{name}/manifest.json", f"Manifest of {name}")
                for name in ALL_STAGES if (profile_dir / name / "manifest.json").is_file()
            ],
        }
        created = json.loads((report / "manifest.json").read_text())["created_utc"] if (
            report / "manifest.json").is_file() else ""
        sections = "\n".join(f"<h2>{html.escape(title)}</h2>\n<ul>\n" + "\n".join(links) + "\n</ul>"
                             for title, links in items.items())
        (staging / "index.html").write_text(f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Reviewer site: federated heart-failure pilot ({html.escape(profile)})</title>
<style>body {{ font-family: "DejaVu Sans", Arial, sans-serif; max-width: 48rem; margin: 2rem auto; line-height: 1.5; }}</style>
</head><body>
<h1>Federated heart-failure readmission pilot: reviewer site</h1>
<p>Profile <b>{html.escape(profile)}</b>{", report built " + html.escape(created) if created else ""}. {data_note}
<code>{html.escape(make)}</code>.</p>
{sections}
</body></html>
""")
        replace_folder(staging, profile_dir / "site")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return profile_dir / "site" / "index.html"
