"""The report is filled from artifacts only, in two languages, and nothing record-level reaches a page."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from report.build import REPORT_DIR, collect, render
from report.leakscan import scan_text, scan_tree

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The smoke pipeline through stage 5, in its own build folder."""
    from compendium.stages import STAGES, run_stage
    from report.site import build_site

    root = tmp_path_factory.mktemp("build")
    for stage in STAGES:
        run_stage(stage, "smoke", build_root=root, progress=False)
    build_site(root / "smoke", "smoke")
    return root / "smoke"


def test_report_numbers_follow_the_artifacts(built, tmp_path):
    copy = tmp_path / "smoke"
    shutil.copytree(built, copy)
    summary_path = copy / "03_federated_training" / "summary.json"
    summary = json.loads(summary_path.read_text())
    before = render(collect(copy), "en")
    assert f"{summary['auroc']['fedavg']['halland']['value']:.3f}" in before
    summary["auroc"]["fedavg"]["halland"]["value"] = 0.987654
    summary_path.write_text(json.dumps(summary))
    after = render(collect(copy), "en")
    assert "AUROC federated (FedAvg) 0.988" in after
    assert after != before


def test_privacy_findings_follow_the_artifacts(built, tmp_path):
    """Attribute inference, canaries, reconstruction and client-level DP are read from stage 4's summary."""
    copy = tmp_path / "smoke"
    shutil.copytree(built, copy)
    summary_path = copy / "04_privacy_evaluation" / "summary.json"
    summary = json.loads(summary_path.read_text())
    gain = summary["attribute_inference"]["model_gain_auc"]["members"]
    assert f"members {gain['value']:.3f} ({gain['lower']:.3f}, {gain['upper']:.3f})" in render(collect(copy), "en")
    summary["attribute_inference"]["model_gain_auc"]["members"] = {"value": 0.4321, "lower": 0.4111, "upper": 0.4554}
    summary["canaries"]["groups"]["canaries"]["auc"] = 0.9876
    summary["batch_reconstruction"]["results"][0]["whole_record_matches"] = 0.6543
    private = [p for p in summary["client_level_dp"]["points"] if p["noise_multiplier"]]
    min(private, key=lambda p: p["epsilon"])["epsilon"] = 0.04
    summary["secure_aggregation"]["position_d"]["partner_recovery_max_abs_error"] = 7.7e-3
    summary_path.write_text(json.dumps(summary))
    after = render(collect(copy), "en")
    assert "members 0.432 (0.411, 0.455)" in after
    assert "(AUC 0.988)" in after
    assert "<td>0.654</td>" in after
    assert "at the smallest epsilon measured, 0.0 (" in after
    assert "recovered its partner's model to within 7.7e-03" in after.replace("&#39;", "'")
    # Findings that were not run on the data say so, with the reason.
    summary["attribute_inference"] = {"not_run": "not run for a reason stated here"}
    summary_path.write_text(json.dumps(summary))
    assert "Not run: not run for a reason stated here." in render(collect(copy), "en")


def test_english_and_swedish_reports_carry_the_same_numbers(built):
    context = collect(built)
    # Measured numbers are printed with 3 or more decimals; fixed text may write "0.5" or "0,5". Swedish
    # writes a decimal comma where the text is translated to its number format: compare with one mark.
    numbers = [[n.replace(",", ".") for n in re.findall(r"(?<![\w.,])\d+[.,]\d{3,}(?![\w.,])",
                                                         re.sub(r"data:image/png;base64,[^\"]+", "", render(context, lang)))]
               for lang in ("en", "sv")]
    assert numbers[0] == numbers[1] and len(numbers[0]) > 50
    sv = render(context, "sv")
    assert "Sammanfattning" in sv and "De tre rättsliga frågorna" in sv


def test_outputs_html_and_pdf_in_both_languages(built):
    names = sorted(p.name for p in (built / "05_report").iterdir())
    assert {"pilot_report.html", "pilot_report.pdf", "pilot_report.sv.html", "pilot_report.sv.pdf"} <= set(names)
    html = (built / "05_report" / "pilot_report.html").read_text()
    assert "http://" not in html.replace("http://www.w3.org", "") and "https://" not in html  # self-contained
    assert html.count("data:image/png;base64,") == 10  # nine stage figures and stage 3's size x difference map
    from report.leakscan import pdf_text

    text = pdf_text(built / "05_report" / "pilot_report.pdf")
    assert "Question 2" in text and "Traceability" in text


def test_every_rendered_page_and_pdf_passes_the_leak_scan(built):
    assert scan_tree(built) == []


def test_the_leak_scan_catches_planted_leaks(built, tmp_path):
    page = (built / "05_report" / "pilot_report.html").read_text()
    planted = {
        "personnummer": "<p>19450312-1234</p>",
        "identifier": "<td>1000000042</td>",
        "identifier_column": "<table><tr><th>person_id</th></tr></table>",
        "small_cell": "<td>3 (0.2%)</td>",
        "record_table": "<table>" + "<tr><td>x</td></tr>" * 250 + "</table>",
    }
    for rule, leak in planted.items():
        findings = scan_text(page.replace("</body>", leak + "</body>"), "planted.html")
        assert [f.rule for f in findings] == [rule], (rule, findings)
    (tmp_path / "leaky.html").write_text(page.replace("</body>", planted["identifier"] + "</body>"))
    assert [f.rule for f in scan_tree(tmp_path)] == ["identifier"]


def test_every_question_has_evidence_and_every_experiment_a_question():
    experiments = yaml.safe_load((REPORT_DIR / "experiments.yaml").read_text())["experiments"]
    questions = {"q1", "q2", "q3"}
    covered = set()
    for experiment in experiments:
        assert experiment["questions"] and set(experiment["questions"]) <= questions, experiment["id"]
        assert experiment["claim"] and experiment["produces"]
        covered |= set(experiment["questions"])
    assert covered == questions


def test_reviewer_site_links_resolve_and_figures_render_in_a_browser(built):
    """Open the site and the report in headless Chromium (Debian's package, driven by Playwright)."""
    from playwright.sync_api import sync_playwright

    from report.build import find_chromium

    chromium = find_chromium()
    assert chromium, "Chromium is required for the browser check: apt-get install chromium (.ci/run does)"
    shots = built / "screenshots"
    shots.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page()
        index = (built / "site" / "index.html").resolve()
        page.goto(index.as_uri())
        links = page.eval_on_selector_all("a", "els => els.map(e => e.getAttribute('href'))")
        assert len(links) >= 10
        for href in links:
            assert (index.parent / href).resolve().is_file(), f"broken link {href}"
        page.screenshot(path=str(shots / "site.png"), full_page=True)
        for name in ("pilot_report.html", "pilot_report.sv.html"):
            page.goto((built / "05_report" / name).resolve().as_uri())
            broken = page.eval_on_selector_all("img", "els => els.filter(e => !e.complete || e.naturalWidth === 0).length")
            count = page.eval_on_selector_all("img", "els => els.length")
            assert count == 10 and broken == 0  # nine stage figures and stage 3's size x difference map
            page.screenshot(path=str(shots / f"{name}.png"), full_page=True)
        # Served over HTTP, the same relative links resolve.
        import functools
        import http.server
        import threading

        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(built))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            base = f"http://127.0.0.1:{server.server_address[1]}/site/index.html"
            page.goto(base)
            for href in page.eval_on_selector_all("a", "els => els.map(e => e.href)"):
                assert page.request.get(href).status == 200, href
        finally:
            server.shutdown()
        for notebook in (built / "notebooks").glob("*.html"):
            page.goto(notebook.resolve().as_uri())
            broken = page.eval_on_selector_all("img", "els => els.filter(e => !e.complete || e.naturalWidth === 0).length")
            assert broken == 0, notebook.name
        browser.close()
    assert (shots / "site.png").stat().st_size > 10_000
