"""Annotations: QuPath GeoJSON in and out (level-0 pixels), version history, validation."""

from __future__ import annotations

import pytest

from portal.reviews.models import Annotation, AuditEvent

pytestmark = pytest.mark.django_db

QUPATH_FEATURE = {
    "type": "Feature",
    "id": "5f1a3c6e-0d8e-4a55-9f0e-6f2b7f8f1a11",
    "geometry": {
        "type": "Polygon",
        "coordinates": [[[1000, 800], [1600, 800], [1600, 1300], [1000, 1300], [1000, 800]]],
    },
    "properties": {
        "objectType": "annotation",
        "name": "Region 1",
        "classification": {"name": "Tumor", "color": [200, 0, 0]},
    },
}
POINT_FEATURE = {
    "type": "Feature",
    "geometry": {"type": "Point", "coordinates": [2500.5, 1200.25]},
    "properties": {"classification": {"name": "Stroma", "colorRGB": -16744448}},
}


@pytest.fixture
def client_a(api_client_for, path_a):
    return api_client_for(path_a)


def _import(client, slide, document):
    return client.post(f"/api/v1/annotations/import/?slide={slide.pk}", document, format="json")


def test_a_qupath_feature_collection_round_trips(client_a, slide_a):
    document = {"type": "FeatureCollection", "features": [QUPATH_FEATURE, POINT_FEATURE]}
    created = _import(client_a, slide_a, document)
    assert created.status_code == 201, created.content
    assert created.json()["created"] == 2
    exported = client_a.get(f"/api/v1/annotations/export/?slide={slide_a.pk}").json()
    assert exported["type"] == "FeatureCollection"
    polygon, point = exported["features"]
    assert polygon["geometry"] == QUPATH_FEATURE["geometry"]
    assert polygon["properties"]["classification"] == {"name": "Tumor", "color": [200, 0, 0]}
    assert polygon["properties"]["name"] == "Region 1"
    assert polygon["properties"]["objectType"] == "annotation"
    assert point["geometry"]["coordinates"] == [2500.5, 1200.25]
    assert point["properties"]["classification"] == {"name": "Stroma", "color": [0, 128, 0]}
    again = _import(client_a, slide_a, exported)  # what we export, we (and QuPath) can read
    assert again.status_code == 201
    actions = AuditEvent.objects.values_list("action", flat=True)
    assert sorted(actions) == ["annotation.export", "annotation.import", "annotation.import"]


def test_a_single_feature_or_a_bare_list_can_be_imported(client_a, slide_a):
    assert _import(client_a, slide_a, QUPATH_FEATURE).json()["created"] == 1
    assert _import(client_a, slide_a, [QUPATH_FEATURE, POINT_FEATURE]).json()["created"] == 2


@pytest.mark.parametrize(
    "geometry,message",
    [
        ({"type": "Circle", "coordinates": [1, 2]}, "not one of"),
        ({"type": "Point", "coordinates": [1, 1e12]}, "sane"),
        ({"type": "Point", "coordinates": [-5, 2]}, "left of or above"),
        ({"type": "Point", "coordinates": [5000, 10]}, "outside the slide"),
        ({"type": "Point", "coordinates": ["a", 2]}, "numbers"),
        ({"type": "LineString", "coordinates": [[1, 2]]}, "at least 2"),
        ({"type": "Polygon", "coordinates": [[[1, 1], [5, 1], [5, 5], [1, 2]]]}, "end where"),
        ({"type": "MultiPolygon", "coordinates": []}, "at least one polygon"),
        ("not a geometry", "GeoJSON object"),
    ],
)
def test_an_invalid_geometry_is_refused_and_nothing_is_created(
    client_a, slide_a, geometry, message
):
    bad = {"type": "Feature", "geometry": geometry, "properties": {}}
    document = {"type": "FeatureCollection", "features": [QUPATH_FEATURE, bad]}
    response = _import(client_a, slide_a, document)
    assert response.status_code == 400
    assert message in response.json()["detail"] and "feature 1" in response.json()["detail"]
    assert not Annotation.objects.exists()


def test_nan_coordinates_are_a_400_not_a_crash(client_a, slide_a):
    body = '{"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, NaN]}}'
    response = client_a.generic(
        "POST", f"/api/v1/annotations/import/?slide={slide_a.pk}", body, "application/json"
    )
    assert response.status_code == 400


def test_a_bad_classification_color_is_refused(client_a, slide_a):
    response = client_a.post(
        "/api/v1/annotations/",
        {
            "slide": slide_a.pk,
            "geometry": QUPATH_FEATURE["geometry"],
            "classification": {"name": "Tumor", "color": [300, 0, 0]},
        },
        format="json",
    )
    assert response.status_code == 400


def test_each_change_adds_a_version_to_the_history(client_a, slide_a):
    created = client_a.post(
        "/api/v1/annotations/",
        {
            "slide": slide_a.pk,
            "geometry": POINT_FEATURE["geometry"],
            "classification": {"name": "Tumor", "color": [1, 2, 3]},
        },
        format="json",
    ).json()
    url = f"/api/v1/annotations/{created['id']}/"
    moved = {"type": "Point", "coordinates": [10, 20]}
    assert client_a.patch(url, {"geometry": moved}, format="json").json()["version"] == 2
    assert client_a.patch(url, {"name": "x"}, format="json", HTTP_IF_MATCH='"1"').status_code == 412
    assert client_a.delete(url).status_code == 204
    history = client_a.get(url + "history/").json()
    assert [v["version"] for v in history] == [1, 2, 3]
    assert history[0]["geometry"] == POINT_FEATURE["geometry"]
    assert history[1]["geometry"] == moved
    assert history[2]["deleted"] is True
    assert client_a.get(f"/api/v1/annotations/?slide={slide_a.pk}").json()["count"] == 0
    export = client_a.get(f"/api/v1/annotations/export/?slide={slide_a.pk}").json()
    assert export["features"] == []


def test_only_the_author_changes_an_annotation(api_client_for, path_a, cohort_a, slide_a):
    from tests.portal_fixtures import make_user

    created = _import(api_client_for(path_a), slide_a, QUPATH_FEATURE).json()
    colleague = api_client_for(make_user("colleague", cohort=cohort_a))
    url = f"/api/v1/annotations/{created['ids'][0]}/"
    assert colleague.get(url).status_code == 200
    assert colleague.patch(url, {"name": "mine"}, format="json").status_code == 403


def test_pathologist_b_cannot_see_a_annotations(api_client_for, path_a, path_b, slide_a):
    created = _import(api_client_for(path_a), slide_a, QUPATH_FEATURE).json()
    client_b = api_client_for(path_b)
    assert client_b.get(f"/api/v1/annotations/{created['ids'][0]}/").status_code == 404
    assert client_b.get("/api/v1/annotations/").json()["count"] == 0
    assert client_b.get(f"/api/v1/annotations/export/?slide={slide_a.pk}").status_code == 404
    assert _import(client_b, slide_a, QUPATH_FEATURE).status_code == 404


def test_import_needs_a_slide_id(client_a):
    response = client_a.post("/api/v1/annotations/import/?slide=x", QUPATH_FEATURE, format="json")
    assert response.status_code == 400
    assert "slide" in response.json()


def test_a_nul_character_in_a_name_is_a_400(client_a, slide_a):
    feature = {**QUPATH_FEATURE, "properties": {"name": "bad\u0000name"}}
    assert _import(client_a, slide_a, feature).status_code == 400


def test_import_merges_by_default_replace_swaps_only_my_annotations(
    client_a, slide_a, api_client_for, path_a
):
    assert _import(client_a, slide_a, QUPATH_FEATURE).status_code == 201
    merged = _import(client_a, slide_a, POINT_FEATURE).json()
    assert merged["created"] == 1 and merged["replaced"] == 0
    assert Annotation.objects.filter(slide=slide_a, deleted=False).count() == 2
    bad = client_a.post(
        f"/api/v1/annotations/import/?slide={slide_a.pk}&mode=wipe", POINT_FEATURE, format="json"
    )
    assert bad.status_code == 400 and "merge" in str(bad.json())
    replaced = client_a.post(
        f"/api/v1/annotations/import/?slide={slide_a.pk}&mode=replace",
        QUPATH_FEATURE,
        format="json",
    ).json()
    assert replaced["created"] == 1 and replaced["replaced"] == 2
    assert Annotation.objects.filter(slide=slide_a, deleted=False).count() == 1
    event = AuditEvent.objects.filter(action="annotation.import").latest("pk")
    assert event.details["mode"] == "replace" and event.details["replaced"] == 2


def test_a_qupath_multipoint_becomes_one_point_each(client_a, slide_a):
    feature = {
        "type": "Feature",
        "geometry": {"type": "MultiPoint", "coordinates": [[10, 20], [30, 40.5]]},
        "properties": {"classification": {"name": "Immune cells", "color": [160, 90, 160]}},
    }
    created = _import(client_a, slide_a, feature)
    assert created.status_code == 201 and created.json()["created"] == 2
    points = Annotation.objects.filter(slide=slide_a).order_by("pk")
    assert [a.geometry for a in points] == [
        {"type": "Point", "coordinates": [10, 20]},
        {"type": "Point", "coordinates": [30, 40.5]},
    ]
    assert {a.classification_name for a in points} == {"Immune cells"}
    empty = _import(client_a, slide_a, {**feature, "geometry": {"type": "MultiPoint"}})
    assert empty.status_code == 400 and "MultiPoint" in str(empty.json())
