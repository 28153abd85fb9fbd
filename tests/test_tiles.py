"""Slide and heatmap tiles through the portal: geometry, alignment, caching, permissions."""

from __future__ import annotations

import asyncio
import io
import re
import time

import numpy as np
import pytest
from PIL import Image

from analysis.heatmap import colormap_lut
from portal.viewer import tileservice
from tests.conftest import shared_slide
from tests.portal_fixtures import make_case, make_user


@pytest.fixture(autouse=True)
def _fresh_tile_caches():
    tileservice.reset_caches()
    yield
    tileservice.reset_caches()


@pytest.fixture
def cmu_case(db, settings, tmp_path, cohort_a):
    import openslide

    from analysis.slides import open_slide
    from analysis.tissue import patch_grid
    from portal.analyses.models import AnalysisJob, ModelVersion, Prediction

    settings.SLIDE_DIR = tmp_path
    source = shared_slide("cmu-1-small-region.svs")
    (tmp_path / "cmu").mkdir()
    (tmp_path / "cmu" / "cmu.svs").symlink_to(source)
    case = make_case(cohort_a, "CMU-1")
    slide = case.slides.get()
    with openslide.OpenSlide(str(source)) as osr:
        slide.width, slide.height = osr.dimensions
    slide.file = "cmu/cmu.svs"
    slide.save()
    with open_slide(source) as image:
        grid = patch_grid(image)
    scores = np.linspace(0.0, 1.0, len(grid.grid_rc)).astype(np.float32)
    model = ModelVersion.objects.create(
        name="m",
        version="1",
        task="t",
        classes=["a", "b"],
        magnification=5,
        bundle_path="/nonexistent",
        sha256="f" * 64,
    )
    job = AnalysisJob.objects.create(
        slide=slide, model_version=model, idempotency_key="k", state="succeeded"
    )
    prediction = Prediction.objects.create(
        job=job,
        slide=slide,
        model_version=model,
        probabilities={"a": 0.2, "b": 0.8},
        predicted_class="b",
        confidence=0.8,
        instance_scores=Prediction.pack_scores(scores),
        grid={
            "n_rows": grid.n_rows,
            "n_cols": grid.n_cols,
            "l0_patch_size": grid.l0_patch_size,
            "grid_rc": grid.grid_rc.tolist(),
        },
    )
    return {"slide": slide, "prediction": prediction, "grid": grid, "scores": scores}


def _login(client, user):
    client.force_login(user)
    return client


def test_slide_dzi_matches_openslide_deepzoom_geometry(client, path_a, cmu_case):
    from openslide import OpenSlide
    from openslide.deepzoom import DeepZoomGenerator

    slide = cmu_case["slide"]
    response = _login(client, path_a).get(f"/slides/{slide.pk}.dzi")
    assert response.status_code == 200
    with OpenSlide(str(shared_slide("cmu-1-small-region.svs"))) as osr:
        expected = DeepZoomGenerator(osr, tile_size=254, overlap=1).get_dzi("jpeg")

    def attrs(xml: str) -> list:
        body = xml.split("?>", 1)[-1]  # without the XML declaration
        return sorted(re.findall(r'(\w+)="([^"]+)"', body))

    assert attrs(response.content.decode()) == attrs(expected)


def test_slide_tile_is_the_deepzoom_tile(client, path_a, cmu_case):
    from openslide import OpenSlide
    from openslide.deepzoom import DeepZoomGenerator

    slide = cmu_case["slide"]
    with OpenSlide(str(shared_slide("cmu-1-small-region.svs"))) as osr:
        dz = DeepZoomGenerator(osr, tile_size=254, overlap=1)
        level = dz.level_count - 1
        expected = np.asarray(dz.get_tile(level, (2, 3)).convert("RGB"), dtype=np.int16)
    response = _login(client, path_a).get(f"/slides/{slide.pk}_files/{level}/2_3.jpeg")
    assert response.status_code == 200
    assert response["Content-Type"] == "image/jpeg"
    got = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"), dtype=np.int16)
    assert got.shape == expected.shape
    assert np.abs(got - expected).mean() < 4  # JPEG re-encoding only


def test_tiles_carry_an_etag_and_answer_304_when_unchanged(client, path_a, cmu_case):
    slide = cmu_case["slide"]
    client = _login(client, path_a)
    first = client.get(f"/slides/{slide.pk}_files/8/0_0.jpeg")
    assert "immutable" in first["Cache-Control"]
    again = client.get(f"/slides/{slide.pk}_files/8/0_0.jpeg", HTTP_IF_NONE_MATCH=first["ETag"])
    assert again.status_code == 304


def test_heatmap_dzi_has_the_slide_geometry(client, path_a, cmu_case):
    slide, prediction = cmu_case["slide"], cmu_case["prediction"]
    client = _login(client, path_a)
    slide_xml = client.get(f"/slides/{slide.pk}.dzi").content.decode()
    heat_xml = client.get(f"/slides/{slide.pk}/heatmap/{prediction.pk}.dzi").content.decode()
    size = re.compile(r"<Size[^>]*/>")
    assert size.search(slide_xml).group(0) == size.search(heat_xml).group(0)
    assert 'TileSize="254"' in heat_xml and 'Overlap="1"' in heat_xml


@pytest.mark.parametrize("levels_below_top", [0, 1, 2])
def test_heatmap_tiles_align_with_slide_tiles_at_every_level(
    client, path_a, cmu_case, levels_below_top
):
    from analysis.heatmap import DeepZoomGeometry

    slide, prediction, grid = cmu_case["slide"], cmu_case["prediction"], cmu_case["grid"]
    scores = cmu_case["scores"]
    geometry = DeepZoomGeometry(slide.width, slide.height)
    level = geometry.level_count - 1 - levels_below_top
    scale = geometry.l0_per_z(level)
    lut = colormap_lut()
    client = _login(client, path_a)
    index = len(grid.grid_rc) // 2
    l0_x, l0_y = grid.l0_xy[index] + grid.l0_patch_size / 2  # centre of one scored cell
    z_x, z_y = int(l0_x // scale), int(l0_y // scale)
    col, row = z_x // 254, z_y // 254
    t_x, t_y, t_w, t_h = geometry.tile_box(level, (col, row))
    heat = client.get(f"/slides/{slide.pk}/heatmap/{prediction.pk}_files/{level}/{col}_{row}.png")
    slide_tile = client.get(f"/slides/{slide.pk}_files/{level}/{col}_{row}.jpeg")
    heat_img = Image.open(io.BytesIO(heat.content))
    slide_img = Image.open(io.BytesIO(slide_tile.content))
    assert heat_img.size == slide_img.size == (t_w, t_h)
    pixel = np.asarray(heat_img.convert("RGBA"))[z_y - t_y, z_x - t_x]
    expected = lut[int(round(float(np.float16(scores[index])) * 255))]
    assert np.abs(pixel[:3].astype(int) - expected.astype(int)).max() <= 2
    assert pixel[3] > 0


def test_a_pathologist_of_another_cohort_gets_404_for_every_tile(client, path_b, cmu_case):
    slide, prediction = cmu_case["slide"], cmu_case["prediction"]
    client = _login(client, path_b)
    for url in (
        f"/slides/{slide.pk}.dzi",
        f"/slides/{slide.pk}_files/8/0_0.jpeg",
        f"/slides/{slide.pk}/heatmap/{prediction.pk}.dzi",
        f"/slides/{slide.pk}/heatmap/{prediction.pk}_files/8/0_0.png",
        f"/slides/{slide.pk}/thumbnail.png",
    ):
        assert client.get(url).status_code == 404, url


def test_anonymous_gets_no_tiles(client, cmu_case):
    slide = cmu_case["slide"]
    assert client.get(f"/slides/{slide.pk}_files/8/0_0.jpeg").status_code == 404
    assert client.get(f"/slides/{slide.pk}.dzi").status_code == 404


def test_a_tile_outside_the_pyramid_is_404(client, path_a, cmu_case):
    slide = cmu_case["slide"]
    client = _login(client, path_a)
    assert client.get(f"/slides/{slide.pk}_files/99/0_0.jpeg").status_code == 404
    assert client.get(f"/slides/{slide.pk}_files/8/999_0.jpeg").status_code == 404


def test_admin_sees_every_cohorts_tiles(client, cmu_case):
    admin = make_user("root", staff=True)
    slide = cmu_case["slide"]
    assert _login(client, admin).get(f"/slides/{slide.pk}.dzi").status_code == 200


def test_unreadable_slide_tile_fails_clearly_without_a_500(client, settings, tmp_path, cohort_a):
    settings.SLIDE_DIR = tmp_path
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "bad.svs").symlink_to(shared_slide("unreadable.svs"))
    case = make_case(cohort_a, "BAD-1")
    slide = case.slides.get()
    slide.file = "bad/bad.svs"
    slide.save()
    user = make_user("reader", cohort=cohort_a)
    response = _login(client, user).get(f"/slides/{slide.pk}_files/0/0_0.jpeg")
    assert response.status_code == 502
    assert b"cannot be read" in response.content


# --- the lean ASGI path that answers tile requests in production (portal/asgi.py) ---------


def _asgi_get(path: str, cookie: str | None = None, etag: str | None = None):
    from asgiref.sync import async_to_sync
    from channels.testing import HttpCommunicator

    from portal.asgi import application

    headers = [(b"host", b"testserver")]
    if cookie:
        headers.append((b"cookie", f"sessionid={cookie}".encode()))
    if etag:
        headers.append((b"if-none-match", etag.encode()))
    path, _, query = path.partition("?")
    communicator = HttpCommunicator(application, "GET", path, headers=headers)
    communicator.scope["query_string"] = query.encode()

    async def run():
        return await communicator.get_response(timeout=30)

    response = async_to_sync(run)()
    response["headers"] = dict(response["headers"])
    return response


def _session_of(user) -> str:
    from django.test import Client

    client = Client()
    client.force_login(user)
    return client.cookies["sessionid"].value


@pytest.fixture
def fast(cmu_case):
    tileservice.reset_caches()
    yield cmu_case
    tileservice.reset_caches()


@pytest.mark.django_db(transaction=True)
def test_fast_path_serves_the_same_tile_as_the_django_view(client, path_a, fast):
    slide = fast["slide"]
    url = f"/slides/{slide.pk}_files/10/1_1.jpeg"
    via_django = _login(client, path_a).get(url)
    via_fast = _asgi_get(url, _session_of(path_a))
    assert via_fast["status"] == 200
    assert via_fast["body"] == via_django.content
    assert via_fast["headers"][b"etag"].decode() == via_django["ETag"]
    assert b"immutable" in via_fast["headers"][b"cache-control"]
    again = _asgi_get(url, _session_of(path_a), etag=via_django["ETag"])
    assert again["status"] == 304


@pytest.mark.django_db(transaction=True)
def test_fast_path_refuses_anonymous_forged_and_other_cohort_sessions(path_b, fast):
    slide, prediction = fast["slide"], fast["prediction"]
    for url in (
        f"/slides/{slide.pk}_files/10/1_1.jpeg",
        f"/slides/{slide.pk}/heatmap/{prediction.pk}_files/10/1_1.png",
    ):
        assert _asgi_get(url)["status"] == 404
        assert _asgi_get(url, "forged-session-key")["status"] == 404
        assert _asgi_get(url, _session_of(path_b))["status"] == 404


@pytest.mark.django_db(transaction=True)
def test_fast_path_drops_a_session_once_the_user_is_deactivated(path_a, fast):
    slide = fast["slide"]
    session = _session_of(path_a)
    url = f"/slides/{slide.pk}_files/10/0_0.jpeg"
    assert _asgi_get(url, session)["status"] == 200
    path_a.is_active = False
    path_a.save()  # revokes cached sessions and grants at once
    assert _asgi_get(url, session)["status"] == 404


@pytest.mark.django_db(transaction=True)
def test_a_prediction_of_another_slide_is_never_served_under_this_slide(
    path_a, fast, settings, cohort_b
):
    """A heatmap cached for slide Y must not leak through /slides/X/heatmap/<Y's prediction>."""
    from portal.analyses.models import AnalysisJob, Prediction

    slide_x = fast["slide"]
    case_y = make_case(cohort_b, "Y-1")
    slide_y = case_y.slides.get()
    slide_y.file, slide_y.width, slide_y.height = slide_x.file, slide_x.width, slide_x.height
    slide_y.save()
    job = AnalysisJob.objects.create(
        slide=slide_y, model_version=fast["prediction"].model_version, idempotency_key="y"
    )
    foreign = Prediction.objects.create(
        job=job,
        slide=slide_y,
        model_version=job.model_version,
        probabilities={},
        predicted_class="b",
        confidence=0.5,
        instance_scores=fast["prediction"].instance_scores,
        grid=fast["prediction"].grid,
    )
    admin = make_user("root2", staff=True)
    # the admin warms the cache for Y's overlay
    assert (
        _asgi_get(
            f"/slides/{slide_y.pk}/heatmap/{foreign.pk}_files/10/0_0.png", _session_of(admin)
        )["status"]
        == 200
    )
    # path_a may see X, not Y: Y's prediction under X's URL is a 404
    url = f"/slides/{slide_x.pk}/heatmap/{foreign.pk}_files/10/0_0.png"
    assert _asgi_get(url, _session_of(path_a))["status"] == 404


def test_pretiled_slides_serve_tiles_from_their_folder(client, path_a, cmu_case):
    slide = cmu_case["slide"]
    from openslide import OpenSlide
    from openslide.deepzoom import DeepZoomGenerator

    with OpenSlide(str(slide.path)) as osr:
        dz = DeepZoomGenerator(osr, tile_size=254, overlap=1)
        total = sum(c * r for c, r in dz.level_tiles)
    assert tileservice.pretile(slide.path) == total
    assert tileservice.pretile(slide.path) == 0  # already there
    on_disk = tileservice.disk_tile_path(slide.path, 11, 1, 2)
    on_disk.write_bytes(b"marker")  # the served bytes must come from the folder
    response = _login(client, path_a).get(f"/slides/{slide.pk}_files/11/1_2.jpeg")
    assert response.content == b"marker"


def test_pretiling_stops_at_the_tile_budget_coarse_levels_first(cmu_case, tmp_path):
    slide = cmu_case["slide"]
    written = tileservice.pretile(slide.path, max_tiles=20)
    assert 0 < written <= 20
    assert tileservice.disk_tile_path(slide.path, 0, 0, 0).is_file()
    assert not tileservice.disk_tile_path(slide.path, 12, 0, 0).exists()


def test_cluster_layer_colours_each_cell_by_its_cluster(client, path_a, cmu_case):
    from analysis.heatmap import CATEGORY_COLOURS, DeepZoomGeometry

    slide, prediction, grid = cmu_case["slide"], cmu_case["prediction"], cmu_case["grid"]
    client = _login(client, path_a)
    base = f"/slides/{slide.pk}/heatmap/{prediction.pk}"
    geometry = DeepZoomGeometry(slide.width, slide.height)
    level = geometry.level_count - 1
    assert client.get(f"{base}_files/{level}/0_0.png?layer=clusters").status_code == 404  # none
    ids = (np.arange(len(grid.grid_rc)) % 3).astype(np.uint8)
    prediction.clusters = ids.tobytes()
    prediction.save()
    tileservice.reset_caches()
    index = len(grid.grid_rc) // 2
    l0_x, l0_y = grid.l0_xy[index] + grid.l0_patch_size / 2
    col, row = int(l0_x // 254), int(l0_y // 254)
    t_x, t_y, _, _ = geometry.tile_box(level, (col, row))
    response = client.get(f"{base}_files/{level}/{col}_{row}.png?layer=clusters&threshold=0.9")
    assert response.status_code == 200
    pixel = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGBA"))[
        int(l0_y) - t_y, int(l0_x) - t_x
    ]
    assert tuple(pixel[:3]) == tuple(CATEGORY_COLOURS[ids[index]])  # thresholds do not apply
    assert client.get(f"{base}_files/{level}/0_0.png?layer=bogus").status_code == 404


@pytest.mark.django_db(transaction=True)
def test_fast_path_stops_serving_at_once_after_logout(client, path_a, fast):
    slide = fast["slide"]
    client.force_login(path_a)
    session = client.cookies["sessionid"].value
    url = f"/slides/{slide.pk}_files/10/0_0.jpeg"
    assert _asgi_get(url, session)["status"] == 200
    client.post("/api/v1/auth/logout")
    assert _asgi_get(url, session)["status"] == 404


@pytest.mark.django_db(transaction=True)
def test_fast_path_stops_serving_at_once_when_membership_is_removed(path_a, fast):
    from portal.cases.models import Membership

    slide = fast["slide"]
    session = _session_of(path_a)
    url = f"/slides/{slide.pk}_files/10/0_0.jpeg"
    assert _asgi_get(url, session)["status"] == 200
    Membership.objects.filter(user=path_a).delete()
    assert _asgi_get(url, session)["status"] == 404


@pytest.mark.django_db(transaction=True)
def test_a_membership_removed_in_another_process_stops_tiles_here_at_once(
    path_a, fast, settings, tmp_path
):
    """Another web process removes the member: it shares only the cache with this one."""
    import os
    import subprocess
    import sys
    import time

    from portal.cases.models import Membership
    from tests.conftest import REPO_ROOT

    cache_dir = tmp_path / "shared-cache"
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
            "LOCATION": str(cache_dir),
        }
    }
    slide = fast["slide"]
    session = _session_of(path_a)
    url = f"/slides/{slide.pk}_files/10/0_0.jpeg"
    assert _asgi_get(url, session)["status"] == 200  # grant cached in this process
    # The other process deletes the row (no signal reaches this process) and revokes.
    Membership.objects.filter(user=path_a)._raw_delete(Membership.objects.db)
    other = (
        "import django; django.setup(); from django.conf import settings; "
        f"settings.CACHES['default'] = {settings.CACHES['default']!r}; "
        "from portal.viewer import tileservice; tileservice.revoke_grants()"
    )
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "portal.settings"}
    env.pop("REDIS_URL", None)
    subprocess.run([sys.executable, "-c", other], cwd=REPO_ROOT, env=env, check=True)
    time.sleep(tileservice.REVOCATION_POLL_S * 2.5)
    assert _asgi_get(url, session)["status"] == 404


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def test_region_larger_than_the_cap_is_refused_without_reading_it(client, path_a, cmu_case):
    slide = cmu_case["slide"]
    before = _peak_rss_mb()
    response = _login(client, path_a).get(f"/slides/{slide.pk}/region.jpeg?x=0&y=0&size=16000")
    assert response.status_code == 400
    assert "size must be between 1 and 8192" in response.json()["detail"]
    assert _peak_rss_mb() - before < 100


def test_region_needing_a_read_over_the_cap_is_refused(client, path_a, cmu_case):
    slide = cmu_case["slide"]  # one pyramid level: 8000 level-0 px would be read as they are
    response = _login(client, path_a).get(f"/slides/{slide.pk}/region.jpeg?x=0&y=0&size=8000")
    assert response.status_code == 400
    assert "ask for a smaller size" in response.json()["detail"]
    ok = client.get(f"/slides/{slide.pk}/region.jpeg?x=0&y=0&size=512&px=96")
    assert ok.status_code == 200 and ok["Content-Type"] == "image/jpeg"


def test_region_with_unreadable_numbers_is_a_400(client, path_a, cmu_case):
    slide = cmu_case["slide"]
    response = _login(client, path_a).get(f"/slides/{slide.pk}/region.jpeg?x=0&y=0&size=big")
    assert response.status_code == 400


def test_thumbnail_size_is_capped():
    from analysis.slides import open_slide

    with open_slide(shared_slide("cmu-1-small-region.svs")) as image:
        with pytest.raises(ValueError, match="outside 1..4096"):
            image.thumbnail((16000, 16000))
        assert max(image.thumbnail((256, 256)).size) == 256


@pytest.mark.django_db(transaction=True)
def test_a_burst_of_tiles_with_one_cookie_shares_one_session_and_grant_lookup(
    path_a, fast, monkeypatch
):
    """When the session and grant are due again, a viewer has dozens of tiles in flight with
    the same cookie: one lookup of each serves all of them (before: one each, serially on
    the database thread, so the burst's last tile waited for all of them)."""
    from asgiref.sync import async_to_sync
    from channels.testing import HttpCommunicator

    from portal.asgi import application

    calls = {"session": 0, "grant": 0}
    session_user, grant_for = tileservice.session_user, tileservice.grant_for

    def counted_session(key):
        calls["session"] += 1
        time.sleep(0.01)  # a database round trip: the burst arrives while it runs
        return session_user(key)

    def counted_grant(user, slide_id):
        calls["grant"] += 1
        time.sleep(0.01)
        return grant_for(user, slide_id)

    monkeypatch.setattr(tileservice, "session_user", counted_session)
    monkeypatch.setattr(tileservice, "grant_for", counted_grant)
    slide = fast["slide"]
    cookie = f"sessionid={_session_of(path_a)}".encode()

    async def burst():
        communicators = [
            HttpCommunicator(
                application,
                "GET",
                f"/slides/{slide.pk}_files/10/{i % 2}_{i // 2 % 2}.jpeg",
                headers=[(b"host", b"testserver"), (b"cookie", cookie)],
            )
            for i in range(32)
        ]
        return await asyncio.gather(*(c.get_response(timeout=30) for c in communicators))

    responses = async_to_sync(burst)()
    assert [r["status"] for r in responses] == [200] * 32
    assert calls == {"session": 1, "grant": 1}
    tileservice.reset_caches()  # due again: the next burst looks up once more, not never
    assert [r["status"] for r in async_to_sync(burst)()] == [200] * 32
    assert calls == {"session": 2, "grant": 2}
