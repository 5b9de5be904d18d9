"""The leak scan: nothing record-level in any rendered page or PDF a person reads.

Rules (each finding names the file, the rule and the offending text):
- `personnummer`: anything shaped like a Swedish personal identity number
  (YYMMDD-NNNN, YYYYMMDD-NNNN, or the same without the separator);
- `identifier`: a standalone run of 9 or more digits (person and visit ids
  are 10 and 13 digits here);
- `identifier_column`: a table header naming a person or visit identifier;
- `record_table`: a table with more than MAX_TABLE_ROWS rows (a record dump);
- `small_cell`: a count-and-percent cell, "n (p%)", with n from 1 to 4.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

MAX_TABLE_ROWS = 200
RULES = {
    "personnummer": re.compile(r"(?<![\w.])(?:19|20)?\d{6}[-+]\d{4}(?![\w.])|(?<![\w.])(?:19|20)\d{10}(?![\w.])"),
    "identifier": re.compile(r"(?<![\w.])\d{9,}(?![\w.])"),
    "identifier_column": re.compile(r"<th[^>]*>\s*(person_id|index_visit_id|visit_occurrence_id|person_source_value)\s*</th>"),
    "small_cell": re.compile(r">\s*[1-4] \(\d+(?:\.\d+)?%\)\s*<"),
}
_TABLE = re.compile(r"<table.*?</table>", re.S)
_ROW = re.compile(r"<tr[\s>]")
# Embedded images and styles are not text a person reads; skip them so base64 is not scanned.
_SKIP = re.compile(r"data:image/[a-z]+;base64,[A-Za-z0-9+/=]+|<style.*?</style>|<script.*?</script>", re.S)


@dataclass(frozen=True)
class Finding:
    """One suspected leak."""

    path: str
    rule: str
    text: str

    def __str__(self) -> str:
        return f"{self.path}: {self.rule}: {self.text!r}"


def scan_text(text: str, source: str, html: bool = True) -> list[Finding]:
    """Return every rule violation in one page's text."""
    text = _SKIP.sub(" ", text)
    findings = []
    for rule, pattern in RULES.items():
        if rule in ("identifier_column", "small_cell") and not html:
            continue
        for match in pattern.finditer(text):
            findings.append(Finding(source, rule, match.group(0)[:80]))
    if html:
        for table in _TABLE.finditer(text):
            rows = len(_ROW.findall(table.group(0)))
            if rows > MAX_TABLE_ROWS:
                findings.append(Finding(source, "record_table", f"table with {rows} rows"))
    return findings


def pdf_text(path: Path) -> str:
    """Return the text of a PDF (every page)."""
    from pypdf import PdfReader

    return "\n".join(page.extract_text() or "" for page in PdfReader(str(path)).pages)


def scan_tree(root: Path) -> list[Finding]:
    """Return findings over every .html and .pdf file below root."""
    findings = []
    for path in sorted(Path(root).rglob("*")):
        if path.suffix == ".html":
            findings += scan_text(path.read_text(errors="replace"), str(path), html=True)
        elif path.suffix == ".pdf":
            findings += scan_text(pdf_text(path), str(path), html=False)
    return findings
