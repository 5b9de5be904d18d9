"""Small synthetic sites for tests: generated OMOP tables plus cohort, laid out as stage 1 does."""
from __future__ import annotations

from pathlib import Path

from data_synth.cohort import CohortSpec, write_cohort
from data_synth.generator import generate_site
from data_synth.sites import site_profile
from fl.data import SiteSplit, load_site, site_dir


def build_sites(root: Path, sizes: dict[str, int], seed: int) -> dict[str, Path]:
    """Generate each site's OMOP tables and cohort under root (as build/<profile>/); return the site folders."""
    folders = {}
    for site, patients in sizes.items():
        folder = site_dir(root, site)
        generate_site(site_profile(site, {"patients": patients}), seed, folder, progress=False)
        write_cohort(folder / "omop", folder, CohortSpec(seed=seed), site, progress=False)
        folders[site] = folder
    return folders


def load_sites(root: Path, sizes: dict[str, int], seed: int) -> dict[str, SiteSplit]:
    """Build the sites under root (`build_sites`) and return every site's patients, all splits together."""
    return {site: load_site(folder, "all") for site, folder in build_sites(root, sizes, seed).items()}
