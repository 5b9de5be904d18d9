"""The pilot report builder (stage 5): templates filled only from stage artifacts."""
