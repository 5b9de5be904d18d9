"""Synthetic OMOP CDM v5.4-shaped EHR for heart-failure patients at two (or
more) Swedish hospitals, and the 30-day readmission cohort built from it.

- `sites`: the calibrated site profiles (one source of truth for site names).
- `vocabulary`: every code set (ICD-10-SE, LOINC, ATC, OMOP concepts) used.
- `generator`: vectorised, chunked generation of the OMOP tables.
- `omop`: the table schemas and the validator every OMOP input goes through.
- `cohort`: the cohort builder, which reads only OMOP tables.
"""
