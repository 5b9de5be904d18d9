"""The pilot report: a template filled only from the pipeline's artifacts.

`collect(build_dir)` reads every stage's summary.json, manifest.json, ledger
and figures into one context; `render(context, language)` fills the HTML
template with the fixed text of that language (report/text/<lang>.yaml);
`write_pdf` prints the HTML with headless Chromium. No number is typed here:
if an artifact changes, the report changes with it (a test checks).
"""
from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path

import jinja2
import pandas as pd
import yaml

from compendium.disclosure import count_cell, count_percent_cell
from compendium.stages import DATA_CARD_STAGE
from compendium.stages import STAGES as PIPELINE_STAGES
from data_synth.features import FEATURES
from fl.evaluate import Estimate

REPORT_DIR = Path(__file__).resolve().parent
LANGUAGES = ("en", "sv")
#: The stages the report reads, as the stage table declares them (synthetic names; see `collect`).
STAGES = PIPELINE_STAGES["05_report"].upstream
FIGURES = {
    "missingness": "01_synthetic_ehr/figures/missingness.png",
    "auroc_forest": "02_local_baselines/figures/auroc_forest.png",
    "size_sweep": "02_local_baselines/figures/size_sweep.png",
    "learning_curves": "03_federated_training/figures/learning_curves.png",
    "data_flow": "03_federated_training/figures/data_flow.png",
    "roc_federated": "04_privacy_evaluation/figures/roc_federated.png",
    "roc_positive_control": "04_privacy_evaluation/figures/roc_positive_control.png",
    "dp_frontier": "04_privacy_evaluation/figures/dp_frontier.png",
    "per_round_exposure": "04_privacy_evaluation/figures/per_round_exposure.png",
}
CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome")


class ReportError(RuntimeError):
    """An artifact the report needs is missing or malformed."""


def _json(path: Path) -> dict:
    if not path.is_file():
        raise ReportError(f"{path} is missing: run the earlier stages first (`make all`)")
    return json.loads(path.read_text())


def _figure(path: Path) -> str:
    if not path.is_file():
        raise ReportError(f"figure {path} is missing")
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def ledger_table(ledger_path: Path) -> list[dict]:
    """Return one row per (message type, direction): records with shapes, bytes per message, messages."""
    lines = [json.loads(line) for line in ledger_path.read_text().splitlines()]
    rows = {}
    for line in lines:
        key = (line["message_type"], line["direction"])
        if key in rows:
            rows[key]["messages"] += 1
            continue
        parts = []
        for record in line["records"]:
            if record["kind"] == "arrays":
                shapes = ", ".join("x".join(map(str, e["shape"])) + " " + e["dtype"] for e in record["entries"])
                parts.append(f"{record['key']}: {shapes}")
            else:
                parts.append(f"{record['key']}: " + ", ".join(e["name"] for e in record["entries"]))
        rows[key] = {"message": line["message_type"], "direction": line["direction"], "records": "; ".join(parts),
                     "bytes": line["bytes"], "messages": 1}
    return list(rows.values())


def _cell(estimate: dict | None, reason: str = "not estimable") -> str:
    return str(Estimate(**estimate)) if estimate else reason


def _value(estimate: dict | None) -> float | None:
    return estimate["value"] if estimate else None


def collect(build_dir: Path) -> dict:
    """Return everything the report shows, read from the artifacts under build_dir.

    On a provided dataset (stage 1 is its data card) there is no oracle and
    no LACE reference; models that were not estimable say why.
    """
    build_dir = Path(build_dir)
    provided = (build_dir / DATA_CARD_STAGE).is_dir()
    stages = (DATA_CARD_STAGE, *STAGES[1:]) if provided else STAGES
    summaries = {stage: _json(build_dir / stage / "summary.json") for stage in stages}
    manifests = {stage: _json(build_dir / stage / "manifest.json") for stage in stages}
    synth, base, fed, priv = (summaries[s] for s in stages)
    sites = list(synth["sites"])
    not_estimable = base.get("not_estimable", {})
    discrimination = []
    for model in ("oracle", "pooled", *(f"local_{s}" for s in sites), "gbt", "lace"):
        if model in base["auroc"]:
            discrimination.append({"model": model, **{s: _cell(base["auroc"][model][s],
                                                               not_estimable.get(model, {}).get(s, "not estimable"))
                                                      for s in sites}})
        elif model in not_estimable:
            discrimination.append({"model": model, **{s: not_estimable[model][s] for s in sites}})
    for strategy in fed["strategies"]:
        discrimination.append({"model": f"federated ({strategy})",
                               **{s: _cell(fed["auroc"][strategy][s]) for s in sites}})
    attacks = [a for a in priv["attacks"] if not a["position"].startswith(("C:", "D:"))]
    updates = [a for a in priv["attacks"] if a["position"].startswith(("C:", "D:"))]
    released = [a for a in attacks if a["position"].startswith("A/B")]
    strongest = max(released, key=lambda a: a["tpr_at_1pct_fpr"]["value"])
    control = [a for a in attacks if a["position"] == "positive control"]
    strongest_control = max(control, key=lambda a: a["tpr_at_1pct_fpr"]["value"])
    first = manifests[stages[0]]
    figures = {name: rel.replace(STAGES[0], stages[0]) for name, rel in FIGURES.items()}
    variables = synth.get("variables") or [{"name": f.name, "kind": f.kind, "source": f.source, "why": f.why}
                                           for f in FEATURES]
    return {
        "data": synth.get("data", {"kind": "synthetic"}),
        "profile": synth["profile"],
        "seed": synth["seed"],
        "commit": (first["git"]["commit"] or "unknown")[:12],
        "created": max(m["created_utc"] for m in manifests.values()),
        "sites": sites,
        "site_rows": [{"site": s, **synth["sites"][s],
                       "patients_cell": count_cell(synth["sites"][s]["patients"]),
                       "index_cell": count_cell(synth["sites"][s]["index_admissions"]),
                       "readmitted_cell": count_percent_cell(synth["sites"][s]["readmitted_30d"],
                                                             synth["sites"][s]["index_admissions"])} for s in sites],
        "discrimination": discrimination,
        "fedavg": {s: _value(fed["auroc"]["fedavg"][s]) for s in sites} if "fedavg" in fed["auroc"] else {},
        "pooled": {s: _value(base["auroc"]["pooled"][s]) for s in sites},
        "local_own": {s: _value(base["auroc"].get(f"local_{s}", {}).get(s)) for s in sites},
        "oracle": {s: _value(base["auroc"]["oracle"][s]) for s in sites} if "oracle" in base["auroc"] else {},
        "bytes": fed["bytes_exchanged_per_site"],
        "rounds": fed["rounds"],
        "strategies": fed["strategies"],
        "sweep": base["size_sweep"],
        "attacks": attacks,
        "updates": updates,
        "strongest": strongest,
        "strongest_control": strongest_control,
        "reference_models": priv["reference_models"],
        "target_models": priv["target_models"],
        "partner_error": priv["partner_recovery_max_error"],
        "dp": priv["dp_frontier"],
        **privacy_findings(priv),
        "not_yet_measured": priv.get("not_yet_measured", []),
        "ledger": ledger_table(build_dir / "03_federated_training" / fed["strategies"][0] / "ledger.jsonl"),
        "variables": variables,
        "figures": {name: _figure(build_dir / rel) for name, rel in figures.items()},
        "parameters": yaml.safe_dump(first["parameters"], sort_keys=False),
        "provenance": [{"stage": s, "wall_seconds": m["wall_seconds"], "created": m["created_utc"],
                        "outputs": len(m["outputs"]),
                        "data_hashes": [f"{o['path']}: {o['sha256'][:16]}" for o in m["outputs"]
                                        if o["path"].endswith(("cohort.parquet", "summary.json", "final_model.npz"))]}
                       for s, m in manifests.items()],
        "packages": first["packages"],
        **question1(build_dir, fed, base, sites),
        "experiments": [_renamed(e, STAGES[0], stages[0]) for e in
                        yaml.safe_load((REPORT_DIR / "experiments.yaml").read_text())["experiments"]],
    }


def question1(build_dir: Path, fed: dict, base: dict, sites: list[str]) -> dict:
    """Return what Question 1's chapter reads: each hospital's gain from federation (DeLong difference of
    FedAvg, and of FedAvg fine-tuned at the hospital, against its own model, on its test patients), the
    settings federated model selection chose, and the size x difference map (synthetic data only)."""
    paired = pd.read_csv(build_dir / "03_federated_training" / "paired_comparisons.csv")
    gains = []
    for site in sites:
        row = {"site": site, "own": _value(base["auroc"].get(f"local_{site}", {}).get(site)),
               "pooled": _value(base["auroc"]["pooled"][site])}
        for name, strategy in (("federated", "fedavg"), ("finetuned", "fedavg+finetune")):
            test = paired[(paired["strategy"] == strategy) & (paired["test_site"] == site)
                          & (paired["versus"] == f"local_{site}")]
            row[name] = None if test.empty else {key: float(test.iloc[0][key]) for key in
                                                 ("auroc_a", "difference", "lower", "upper")}
        gains.append(row)
    chosen = fed.get("selection")
    federation_map = fed.get("federation_map")
    default_cell = None
    if federation_map:
        cells = [c for c in federation_map["cells"] if c["role"] == "smaller" and c["model"] == "federated"]
        largest = max(c["small_train_stays"] for c in cells)
        default_cell = min(cells, key=lambda c: (abs(c["level"] - 1.0), largest - c["small_train_stays"]))
    figure = build_dir / "03_federated_training" / "figures" / "federation_map.png"
    return {"q1_gains": gains, "selection": chosen, "federation_map": federation_map, "map_default": default_cell,
            "map_figure": _figure(figure) if federation_map and figure.is_file() else None}


def privacy_findings(priv: dict) -> dict:
    """Return stage 4's attacks beyond membership, and its defences beyond DP-SGD, as the report shows them.

    Attribute inference and canaries may be absent ({"not_run": reason}) on
    provided data; the reason is shown instead.
    """
    attribute = priv["attribute_inference"]
    reconstruction = priv["batch_reconstruction"]
    most = max(row["rounds observed"] for row in reconstruction["results"])  # the attacker's best case
    whole = {(row["batch_size"], row["attacker"]): row["whole_record_matches"]
             for row in reconstruction["results"] if row["rounds observed"] == most}
    client = priv["client_level_dp"]
    no_dp = next(p for p in client["points"] if not p["noise_multiplier"])
    private = [p for p in client["points"] if p["noise_multiplier"]]
    strictest = min(private, key=lambda p: p["epsilon"]) if private else None
    return {
        "attribute": attribute,
        "canaries": priv["canaries"],
        "reconstruction": reconstruction,
        # Whole records recovered from a batch's gradients over `most` rounds, per batch size: attack, marginals.
        "reconstruction_whole": [{"batch_size": size, "attack": whole[(size, "gradient matching")],
                                  "marginals": whole[(size, "population marginals")]}
                                 for size in sorted({size for size, _ in whole})],
        "reconstruction_rounds": most,
        "dp_attacks": priv["dp_frontier"].get("attacks_on_dp_reference_pipelines", []),
        "client_dp": client,
        "client_dp_sites": [key.removeprefix("auroc_") for key in no_dp if key.startswith("auroc_")],
        "client_dp_line": None if strictest is None else {
            "epsilon": strictest["epsilon"], "noise": strictest["noise_multiplier"],
            "auroc": _mean_auroc(strictest), "auroc_no_dp": _mean_auroc(no_dp)},
        "secure_aggregation": priv.get("secure_aggregation"),
    }


def _mean_auroc(point: dict) -> float | None:
    values = [v for k, v in point.items() if k.startswith("auroc_") and v is not None]
    return sum(values) / len(values) if values else None


def _renamed(experiment: dict, old: str, new: str) -> dict:
    """Return an experiment entry with stage `old` called `new` (the data card on provided data)."""
    return yaml.safe_load(yaml.safe_dump(experiment).replace(old, new))


class _KeepOthers(dict):
    """Format values that leave placeholders filled later (e.g. {fed} in k_site_line) as they are."""

    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def render(context: dict, language: str) -> str:
    """Return the self-contained report HTML in `language`."""
    if language not in LANGUAGES:
        raise ValueError(f"language must be one of {LANGUAGES}, got {language!r}")
    text = yaml.safe_load((REPORT_DIR / "text" / f"{language}.yaml").read_text())
    overrides = text.pop("provided")
    if context.get("data", {}).get("kind") == "provided":
        # Provided data: say which data were used, and drop what holds only for the synthetic generator.
        data = context["data"]
        fill = _KeepOthers(name=data["name"], description=data.get("description", "").strip(), sites=len(context["sites"]))
        text.update({key: value.format_map(fill) if isinstance(value, str) else value
                     for key, value in overrides.items()})
    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(REPORT_DIR / "templates"),
                                     autoescape=jinja2.select_autoescape(["html", "j2"]), undefined=jinja2.StrictUndefined)
    return environment.get_template("report.html.j2").render(t=text, c=context)


def find_chromium() -> str | None:
    """Return the path of a headless-capable Chromium, or None."""
    for name in CHROMIUM_CANDIDATES:
        if path := shutil.which(name):
            return path
    return None


def write_pdf(html: Path, pdf: Path) -> Path:
    """Print an HTML file to PDF with headless Chromium."""
    chromium = find_chromium()
    if chromium is None:
        raise ReportError("no Chromium found for the PDF: install Debian's package (apt-get install chromium)")
    result = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--no-pdf-header-footer",
         f"--print-to-pdf={pdf}", html.resolve().as_uri()],
        capture_output=True, text=True, timeout=120)
    if result.returncode != 0 or not pdf.is_file():
        raise ReportError(f"Chromium could not print {html} to PDF: {result.stderr[-500:]}")
    return pdf


def build(build_dir: Path, output_dir: Path, pdf: bool = True) -> dict[str, Path]:
    """Write pilot_report.html (English), pilot_report.sv.html (Swedish) and their PDFs; return the paths."""
    context = collect(build_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for language in LANGUAGES:
        suffix = "" if language == "en" else f".{language}"
        html = output_dir / f"pilot_report{suffix}.html"
        html.write_text(render(context, language))
        written[f"html_{language}"] = html
        if pdf:
            written[f"pdf_{language}"] = write_pdf(html, output_dir / f"pilot_report{suffix}.pdf")
    return written


def numbers_table(context: dict) -> pd.DataFrame:
    """Return the headline numbers as a small table (for the notebook)."""
    columns = {"federated (FedAvg)": context["fedavg"], "pooled": context["pooled"],
               "own site only": context["local_own"]}
    if context["oracle"]:
        columns["oracle"] = context["oracle"]
    return pd.DataFrame(columns).astype(float).round(3)
