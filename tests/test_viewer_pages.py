"""The viewer's pages and JSON helpers through Django's test client (no browser)."""

from __future__ import annotations

import numpy as np
import pytest
from django.contrib.auth import get_user_model

from portal.analyses.models import AnalysisJob, ModelVersion, Prediction
from portal.cases.models import Case, Cohort, Membership, Slide
from portal.reviews.models import AuditEvent
from portal.viewer.views import top_regions

PASSWORD = "viewer-pages-pw-3"


@pytest.fixture
def world(db):
    users = get_user_model().objects
    alice = users.create_user("alice", password=PASSWORD)
    bob = users.create_user("bob", password=PASSWORD)
    cohort_a = Cohort.objects.create(name="A", slug="a")
    cohort_b = Cohort.objects.create(name="B", slug="b")
    Membership.objects.create(user=alice, cohort=cohort_a, role="pathologist")
    Membership.objects.create(user=bob, cohort=cohort_b, role="pathologist")
    case = Case.objects.create(
        cohort=cohort_a, patient_id="P1", accession_number="ACC-1", priority="urgent"
    )
    other = Case.objects.create(cohort=cohort_b, patient_id="P2", accession_number="ACC-2")
    slide = Slide.objects.create(
        case=case, original_name="s.svs", status="ready", width=1000, height=800, mpp=2.0
    )
    model = ModelVersion.objects.create(
        name="m",
        version="1",
        task="t",
        classes=["benign", "malignant"],
        magnification=5,
        bundle_path="-",
        sha256="0" * 64,
    )
    job = AnalysisJob.objects.create(
        slide=slide, model_version=model, idempotency_key="k", state="succeeded"
    )
    grid_rc = np.array([[r, c] for r in range(6) for c in range(8)])  # (48, 2)
    scores = np.zeros(len(grid_rc))
    scores[[0, 1, 20, 47]] = [0.9, 0.8, 0.7, 0.6]  # cells (0,0), (0,1), (2,4), (5,7)
    prediction = Prediction.objects.create(
        job=job,
        slide=slide,
        model_version=model,
        predicted_class="malignant",
        confidence=0.91,
        probabilities={"benign": 0.09, "malignant": 0.91},
        instance_scores=Prediction.pack_scores(scores),
        grid={"n_rows": 6, "n_cols": 8, "l0_patch_size": 64.0, "grid_rc": grid_rc.tolist()},
    )
    return {
        "alice": alice,
        "bob": bob,
        "case": case,
        "other": other,
        "slide": slide,
        "prediction": prediction,
    }


def _client(client, user):
    client.force_login(user)
    return client


def test_every_page_needs_a_login(client, world):
    for path in (
        "/",
        f"/cases/{world['case'].pk}/",
        f"/viewer/predictions/{world['prediction'].pk}/top-regions.json",
    ):
        response = client.get(path)
        assert response.status_code == 302 and response["Location"].startswith("/login/")


def test_login_page_signs_in_and_lands_on_the_worklist(client, world):
    assert client.get("/login/").status_code == 200
    response = client.post("/login/", {"username": "alice", "password": PASSWORD, "next": "/"})
    assert response.status_code == 302 and response["Location"] == "/"


def test_worklist_shows_my_cohorts_cases_with_the_ai_call(client, world):
    body = _client(client, world["alice"]).get("/").content.decode()
    assert "ACC-1" in body and "ACC-2" not in body
    assert "malignant" in body and "91%" in body


def test_worklist_filters_and_partial_rows(client, world):
    c = _client(client, world["alice"])
    assert "ACC-1" not in c.get("/?priority=routine").content.decode()
    rows = c.get("/?priority=urgent&partial=rows").content.decode()
    assert "ACC-1" in rows and "<html" not in rows


def test_case_page_carries_the_viewer_config(client, world):
    response = _client(client, world["alice"]).get(f"/cases/{world['case'].pk}/")
    assert response.status_code == 200
    config = response.context["viewer_config"]
    slide = config["slides"][0]
    assert slide["dzi"] == f"/slides/{world['slide'].pk}.dzi" and slide["mpp"] == 2.0
    assert slide["prediction"]["heatmap_dzi"].endswith(f"/heatmap/{world['prediction'].pk}.dzi")
    assert config["user"]["can_write"] is True and len(config["legend"]) == 11


def test_case_of_another_cohort_is_404(client, world):
    c = _client(client, world["bob"])
    assert c.get(f"/cases/{world['case'].pk}/").status_code == 404
    assert (
        c.get(f"/viewer/predictions/{world['prediction'].pk}/top-regions.json").status_code == 404
    )
    assert c.get(f"/slides/{world['slide'].pk}/region.jpeg?x=0&y=0&size=64").status_code == 404


def test_viewing_a_signed_case_is_audited(client, world):
    Case.objects.filter(pk=world["case"].pk).update(status="signed")
    _client(client, world["alice"]).get(f"/cases/{world['case'].pk}/")
    assert AuditEvent.objects.filter(action="case.view", case=world["case"]).count() == 1


def test_top_regions_are_highest_scores_spread_apart(client, world):
    response = _client(client, world["alice"]).get(
        f"/viewer/predictions/{world['prediction'].pk}/top-regions.json?k=3"
    )
    regions = response.json()["regions"]
    # (0,1) is next to (0,0): the same region, so it is skipped.
    assert [r["grid_rc"] for r in regions] == [[0, 0], [2, 4], [5, 7]]
    assert regions[1]["l0_xy"] == [4 * 64, 2 * 64] and regions[1]["l0_size"] == 64.0


def test_top_regions_suppression_keeps_order_and_limit():
    grid_rc = np.array([[0, 0], [0, 9], [9, 0], [9, 9]])
    scores = np.array([0.1, 0.9, 0.5, 0.7])
    assert top_regions(scores, grid_rc, k=2) == [1, 3]


def test_static_asset_view_refuses_unknown_files(client, db):
    assert client.get("/static/no-such-file.js").status_code == 404


def test_top_regions_fill_with_neighbouring_hot_cells_never_with_empty_ones():
    grid_rc = np.array([[r, c] for r in range(6) for c in range(6)])
    scores = np.zeros(36)
    scores[[14, 15, 20, 21]] = [0.95, 0.9, 0.8, 0.3]  # one hot spot: (2,2) (2,3) (3,2) (3,3)
    picked = top_regions(scores, grid_rc, k=12)
    # the spot's best cell, then its neighbours down to half the top score; no 0.00 padding
    assert picked == [14, 15, 20]
    assert top_regions(np.zeros(36), grid_rc, k=12) == []
