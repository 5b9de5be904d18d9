"""Synthetic OMOP CDM v5.4-shaped EHR for heart-failure patients at two (or
more) Swedish hospitals, and the 30-day readmission cohort built from it.

- `sites`: the calibrated site profiles (one source of truth for site names).
- `vocabulary`: every code set (ICD-10-SE, LOINC, ATC, OMOP concepts) used.
- `features`: the modelling table's columns (features, label, split), imported by every stage.
- `generator`: vectorised, chunked generation of the OMOP tables, calibrated to the
  published figures in docs/calibration.md.
- `omop`: the table schemas and the validator every OMOP input goes through.
- `cohort`: the cohort builder, which reads only OMOP tables.
"""
