"""Class evidence in the portal: stored with the prediction, served as the default overlay."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
from PIL import Image

from analysis.heatmap import DeepZoomGeometry
from tests import test_tiles

# the tile tests' slide, prediction and cache reset
cmu_case = test_tiles.cmu_case
_fresh_tile_caches = test_tiles._fresh_tile_caches
_login = test_tiles._login


def _pixel(client, base, slide, grid, index, layer):
    """RGBA of the overlay pixel at the centre of grid cell ``index`` (coarsest full level)."""
    geometry = DeepZoomGeometry(slide.width, slide.height)
    level = geometry.level_count - 1
    l0_x, l0_y = grid.l0_xy[index] + grid.l0_patch_size / 2
    col, row = int(l0_x // 254), int(l0_y // 254)
    t_x, t_y, _, _ = geometry.tile_box(level, (col, row))
    response = client.get(f"{base}_files/{level}/{col}_{row}.png?layer={layer}")
    assert response.status_code == 200
    image = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGBA"))
    return image[int(l0_y) - t_y, int(l0_x) - t_x]


def test_evidence_layer_is_clear_where_attention_is_hot_but_evidence_is_against(
    client, path_a, cmu_case
):
    from portal.analyses.models import Prediction

    slide, prediction, grid = cmu_case["slide"], cmu_case["prediction"], cmu_case["grid"]
    n = len(grid.grid_rc)
    hot, marked = n // 2, n // 3
    attention = np.full(n, 0.1, np.float32)
    attention[hot] = 1.0
    evidence = np.full(n, -1.0, np.float32)  # the whole slide argues against the class
    evidence[marked] = 3.0
    prediction.instance_scores = Prediction.pack_scores(attention)
    prediction.evidence_scores = Prediction.pack_scores(evidence)
    prediction.evidence_class = "b"
    prediction.save()
    client = _login(client, path_a)
    base = f"/slides/{slide.pk}/heatmap/{prediction.pk}"
    assert _pixel(client, base, slide, grid, hot, "score")[3] > 0  # attention: painted
    assert _pixel(client, base, slide, grid, hot, "evidence")[3] == 0  # evidence: clear
    assert _pixel(client, base, slide, grid, marked, "evidence")[3] > 0


def test_case_page_names_the_evidence_class_and_older_predictions_have_none(
    client, path_a, cmu_case
):
    from portal.analyses.models import Prediction

    slide, prediction = cmu_case["slide"], cmu_case["prediction"]
    client = _login(client, path_a)
    config = client.get(f"/cases/{slide.case_id}/").context["viewer_config"]
    assert config["slides"][0]["prediction"]["evidence_class"] == ""  # attention only
    prediction.evidence_scores = Prediction.pack_scores(np.zeros(len(cmu_case["scores"])))
    prediction.evidence_class = "b"
    prediction.save()
    config = client.get(f"/cases/{slide.case_id}/").context["viewer_config"]
    assert config["slides"][0]["prediction"]["evidence_class"] == "b"
    page = client.get(f"/cases/{slide.case_id}/").content.decode()
    assert "Where the model looked" in page and 'value="evidence"' in page


def test_analysis_task_stores_evidence_as_float16_beside_attention(cmu_case):
    from portal.analyses.models import AnalysisJob, ModelVersion
    from portal.analyses.tasks import _store_prediction

    slide, grid = cmu_case["slide"], cmu_case["grid"]
    model = ModelVersion.objects.create(
        name="m2",
        version="1",
        task="t",
        classes=["normal", "lesion"],
        magnification=5,
        bundle_path="/nonexistent",
        sha256="e" * 64,
    )
    job = AnalysisJob.objects.create(slide=slide, model_version=model, idempotency_key="k2")
    n = len(grid.grid_rc)
    evidence = np.linspace(-4, 4, n).astype(np.float32)
    result = SimpleNamespace(
        grid=grid,
        probabilities={"normal": 0.9, "lesion": 0.1},
        predicted_class="normal",
        confidence=0.9,
        instance_scores=np.linspace(0, 1, n).astype(np.float32),
        clusters=np.zeros(n, np.uint8),
        evidence_scores=evidence,
        evidence_class="lesion",
        magnification=5.0,
    )
    stored = _store_prediction(job, result)
    stored.refresh_from_db()
    assert stored.evidence_class == "lesion"
    assert np.allclose(stored.evidence(), evidence, atol=4e-3)
    assert len(bytes(stored.evidence_scores)) == 2 * n
