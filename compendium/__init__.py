"""Pipeline plumbing shared by every stage: parameter profiles, stage runs,
manifests, atomic artifact writes and disclosure control.

The science lives in `data_synth` (synthetic EHR) and `fl` (models, training,
federation, privacy); this package only moves their results through the
pipeline and keeps the promises the report relies on (provenance,
reproducibility, no record-level output).
"""
