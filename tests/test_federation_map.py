"""The size x heterogeneity map: the partner moved along its differences, cells reproducible from the seed."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from compendium.params import PARAMS_DIR, load_params
from data_synth.heterogeneity import partner_at
from data_synth.sites import SiteProfile, site_profile
from fl import federation_map


def test_the_partner_moves_along_its_differences_from_the_smaller_hospital():
    small, partner = site_profile("halland"), site_profile("sahlgrenska")
    assert partner_at(small, partner, 1.0) == partner  # level 1: the configured partner, exactly
    alike = partner_at(small, partner, 0.0)
    assert alike.patients == partner.patients and alike.readmission_logit_shift == small.readmission_logit_shift
    assert alike.record_coverage == small.record_coverage and alike.ef_class_probs == small.ef_class_probs
    assert all(v == 1.0 for v in alike.risk_effect_scale.values())  # no concept shift left
    doubled = partner_at(small, partner, 2.0)
    gap = partner.readmission_logit_shift - small.readmission_logit_shift
    assert doubled.readmission_logit_shift == pytest.approx(small.readmission_logit_shift + 2 * gap)
    assert doubled.risk_effect_scale["prior_admissions"] == pytest.approx(0.2)  # 1 - 2 * 0.4
    assert sum(doubled.ef_class_probs) == pytest.approx(1.0)
    # Far beyond the data, every knob is clipped into its valid range rather than failing validation.
    extreme = partner_at(small, partner, 3.0)
    assert isinstance(extreme, SiteProfile) and 0 < extreme.record_coverage <= 1


@pytest.fixture(scope="module")
def tiny():
    smoke = load_params(PARAMS_DIR / "smoke.yaml")
    sites = {"halland": {"overrides": {"patients": 500}}, "sahlgrenska": {"overrides": {"patients": 700}}}
    synthetic = smoke.synthetic.model_validate({**smoke.synthetic.model_dump(), "sites": sites})
    settings = smoke.federated.map.model_copy(update={"size_fractions": [0.5, 1.0], "levels": [0.0, 2.0], "repeats": 2})
    federated = smoke.federated.model_copy(update={"rounds": 3, "finetune_epochs": 10, "map": settings})
    return smoke.model_copy(update={"synthetic": synthetic, "federated": federated})


def test_map_cells_are_reproducible_from_the_seed_and_carry_intervals(tiny):
    first = federation_map.run_map(tiny, "halland", "sahlgrenska", progress=False)
    second = federation_map.run_map(tiny, "halland", "sahlgrenska", progress=False)
    pd.testing.assert_frame_equal(first, second)
    assert set(first["model"]) == set(federation_map.MODELS)
    assert len(first) == 2 * 2 * 2 * 2 * len(federation_map.MODELS)  # levels x sizes x repeats x sites x models
    # The smaller hospital's training data shrink with the fraction; the partner's own model does not change.
    stays = first.groupby("fraction")["small_train_stays"].first()
    assert stays[0.5] < stays[1.0]
    partner_local = first[(first["role"] == "partner") & (first["model"] == "local")]
    assert partner_local.groupby(["level", "repeat"])["auroc"].nunique().eq(1).all()
    gains = federation_map.gains(first)
    finite = gains.dropna(subset=["lower"])
    assert len(finite) > 0 and (finite["lower"] <= finite["gain"]).all() and (finite["gain"] <= finite["upper"]).all()
    assert np.all(gains["repeats"] == 2)
    headline = federation_map.headline(gains)
    assert sum(len(v) for v in headline.values()) == 2 * 2  # every (level, size) cell of the smaller hospital
