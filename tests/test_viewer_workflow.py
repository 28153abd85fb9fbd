"""A pathologist's working day in the viewer, in Chromium: annotations that are never lost
(import merges, undo/redo), tools that stay armed, the case's context, second opinions and the
worklist. Shares the daphne portal and the browser of ``tests/test_browser.py`` and adds its own
cases to it, so that these tests never touch the cases the other module signs.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from tests.browser_fixtures import PASSWORD, Session, _portal_env, _run
from tests.conftest import REPO_ROOT, shared_slide
from tests.test_browser import CHROMIUM, DIST

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason=f"{CHROMIUM} missing: apt-get install chromium"
    ),
    pytest.mark.skipif(not DIST.exists(), reason="frontend not built: run `make frontend`"),
]

CLINICAL_QUESTION = "Re-excision of a basal cell carcinoma: are the margins clear?"
N_MANY = 600


def seed_more(slide_a_id: int) -> dict:
    """Cases of this module (runs in a subprocess configured for the portal's database)."""
    import shutil
    from datetime import timedelta
    from pathlib import Path

    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.utils import timezone

    from portal.analyses.models import AnalysisJob, ModelVersion, Prediction
    from portal.cases.models import Case, Cohort, Membership, Slide

    users = get_user_model().objects
    cohort_a = Cohort.objects.get(slug="skin-a")
    path_c = users.create_user("path_c", password=PASSWORD)
    Membership.objects.create(user=path_c, cohort=cohort_a, role="pathologist")
    users.create_user("admin_a", password=PASSWORD, is_staff=True, is_superuser=True)
    template = Slide.objects.get(pk=slide_a_id)
    model = ModelVersion.objects.get()
    source_prediction = template.predictions.get()

    def case_with_slide(accession: str, **fields) -> tuple[Case, Slide]:
        case = Case.objects.create(
            cohort=cohort_a, patient_id=f"P-{accession[-4:]}", accession_number=accession, **fields
        )
        slide = Slide.objects.create(
            case=case,
            original_name=template.original_name,
            status="ready",
            sha256=template.sha256,
            width=template.width,
            height=template.height,
            mpp=template.mpp,
            magnification=template.magnification,
            level_count=template.level_count,
        )
        folder = Path(settings.SLIDE_DIR) / f"{case.pk}" / f"{slide.pk}"
        folder.mkdir(parents=True)
        shutil.copy(template.path, folder / template.original_name)
        slide.file = f"{case.pk}/{slide.pk}/{template.original_name}"
        slide.save()
        return case, slide

    def predict(slide: Slide, predicted: str, confidence: float) -> None:
        job = AnalysisJob.objects.create(
            slide=slide,
            model_version=model,
            idempotency_key=f"{slide.sha256}:{slide.pk}",
            state="succeeded",
            progress=1.0,
        )
        Prediction.objects.create(
            job=job,
            slide=slide,
            model_version=model,
            predicted_class=predicted,
            confidence=confidence,
            probabilities={"benign": 1 - confidence, "malignant": confidence}
            if predicted == "malignant"
            else {"benign": confidence, "malignant": 1 - confidence},
            instance_scores=source_prediction.instance_scores,
            grid=source_prediction.grid,
            clusters=bytes(i % 4 for i in range(len(source_prediction.grid["grid_rc"]))),
        )

    case_draw, slide_draw = case_with_slide("S24-0101", status="ready")
    predict(slide_draw, "malignant", 0.76)
    case_sign, slide_sign = case_with_slide(
        "S24-0102", status="ready", clinical_question=CLINICAL_QUESTION, priority="urgent"
    )
    predict(slide_sign, "malignant", 0.99)
    case_failed, slide_failed = case_with_slide("S24-0103", status="ready")
    AnalysisJob.objects.create(
        slide=slide_failed,
        model_version=model,
        idempotency_key=f"failed:{slide_failed.pk}",
        state="failed",
        stage="tissue",
        error="fluorescence-dapi.ndpi: no tissue found at 5x (is this a fluorescence slide?)",
    )
    from portal.reviews.models import Diagnosis

    case_signed, _ = case_with_slide("S24-0104", status="signed")
    created = timezone.now() - timedelta(days=3)
    Case.objects.filter(pk=case_signed.pk).update(created_at=created)
    Diagnosis.objects.create(
        case=case_signed,
        status="signed",
        call="benign",
        author=path_c,
        signed_by=path_c,
        signed_at=created + timedelta(hours=2, minutes=5),
        content_hash="0" * 64,
    )
    # Many open cases of their own cohort, the oldest routine ones created first.
    many = Cohort.objects.create(name="Many", slug="many")
    path_m = users.create_user("path_m", password=PASSWORD)
    Membership.objects.create(user=path_m, cohort=many, role="pathologist")
    now = timezone.now()
    Case.objects.bulk_create(
        Case(
            cohort=many,
            patient_id=f"M-{i:04d}",
            accession_number=f"M24-{i:04d}",
            status="ready",
            priority="urgent" if i % 100 == 7 else "routine",
        )
        for i in range(N_MANY)
    )
    for i, case in enumerate(Case.objects.filter(cohort=many).order_by("pk")):
        Case.objects.filter(pk=case.pk).update(created_at=now - timedelta(hours=N_MANY - i))
    return {
        "case_draw": case_draw.pk,
        "slide_draw": slide_draw.pk,
        "case_sign": case_sign.pk,
        "slide_sign": slide_sign.pk,
        "case_failed": case_failed.pk,
        "slide_failed": slide_failed.pk,
        "case_signed": case_signed.pk,
        "slide_signed": case_signed.slides.get().pk,
    }


@pytest.fixture(scope="module")
def cases(portal):
    env = _portal_env(portal["db"].parent)
    out = _run(
        [
            sys.executable,
            "-c",
            "import django, json; django.setup(); from tests.test_viewer_workflow import seed_more; "
            f"print(json.dumps(seed_more({portal['slide_a']})))",
        ],
        env,
    )
    return {**portal, **json.loads(out.strip().splitlines()[-1])}


# ---------------------------------------------------------------- helpers


def wait_until(check, timeout_s: float = 8.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def server_annotations(s: Session, slide_id: int) -> list[dict]:
    response = s.page.request.get(s.url(f"/api/v1/annotations?slide={slide_id}&page_size=500"))
    assert response.ok, response.text()
    return response.json()["results"]


CLEAR = """async (ids) => {
  const token = document.cookie.match(/csrftoken=([^;]+)/)[1];
  for (const id of ids) {
    await fetch(`/api/v1/annotations/${id}`, { method: 'DELETE', headers: { 'X-CSRFToken': token } });
  }
}"""


def clear_slide(s: Session, slide_id: int) -> None:
    s.page.evaluate(CLEAR, [a["id"] for a in server_annotations(s, slide_id)])
    assert server_annotations(s, slide_id) == []


def open_case(s: Session, case_id: int) -> None:
    s.page.goto(s.url(f"/cases/{case_id}/"))
    s.wait_js("() => window.__lowmag && window.__lowmag.firstTilePaintMs !== undefined")
    s.wait_js("() => window.__lowmag.annotationLoad !== undefined")


def viewer_centre(s: Session) -> tuple[float, float]:
    box = s.page.locator("#viewer").bounding_box()
    return box["x"] + box["width"] / 2, box["y"] + box["height"] / 2


def draw(s: Session, tool: str, dx: float = 0, dy: float = 0) -> None:
    """Draw one shape with ``tool`` (already armed) around the viewer's centre shifted by dx, dy."""
    page = s.page
    cx, cy = viewer_centre(s)
    cx, cy = cx + dx, cy + dy
    if tool == "rectangle":
        page.mouse.move(cx - 40, cy - 30)
        page.mouse.down()
        page.mouse.move(cx, cy, steps=4)
        page.mouse.move(cx + 40, cy + 30, steps=4)
        page.mouse.up()
    elif tool == "polygon":
        corners = [(cx - 40, cy - 30), (cx + 35, cy - 35), (cx + 45, cy + 25), (cx - 30, cy + 35)]
        for x, y in corners:
            page.mouse.click(x, y)
            page.wait_for_timeout(80)
        page.mouse.click(*corners[0])
    elif tool == "point":
        page.mouse.click(cx, cy)
    elif tool == "freehand":
        import math

        page.mouse.move(cx + 40, cy)
        page.mouse.down()
        for i in range(1, 25):
            angle = 2 * math.pi * i / 24
            page.mouse.move(cx + 40 * math.cos(angle), cy + 30 * math.sin(angle))
        page.mouse.up()
    page.wait_for_timeout(150)


def live_count(s: Session, slide_id: int, n: int, what: str = "") -> list[dict]:
    """Wait until the server holds ``n`` live annotations on the slide; return them."""
    found: list[list[dict]] = []

    def check() -> bool:
        found[:] = [server_annotations(s, slide_id)]
        return len(found[0]) == n

    wait_until(check, what=f"{n} annotations on the server {what}")
    return found[0]


# ---------------------------------------------------------------- annotations are never lost


def test_import_merges_by_default_and_replace_needs_confirmation(session, cases, tmp_path):
    s = session("import")
    page = s.page
    deletes: list[str] = []
    page.on("request", lambda r: r.method == "DELETE" and deletes.append(r.url))
    s.login("path_a")
    open_case(s, cases["case_draw"])
    page.click("[data-tool=rectangle]")
    draw(s, "rectangle")
    [mine] = live_count(s, cases["slide_draw"], 1, "after drawing")
    page.reload()
    s.wait_js("() => window.__lowmag.annotationLoad?.count === 1")

    document = {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "geometry": {"type": "Point", "coordinates": [100, 120]},
                "properties": {"classification": {"name": "Stroma", "color": [150, 200, 150]}},
            },
            {  # QuPath writes points annotations as MultiPoint
                "type": "Feature",
                "geometry": {"type": "MultiPoint", "coordinates": [[200, 220], [210, 230]]},
                "properties": {"objectType": "annotation"},
            },
        ],
    }
    upload = tmp_path / "qupath.geojson"
    upload.write_text(json.dumps(document))
    page.click("#import-open")
    page.set_input_files("#import-geojson", str(upload))
    page.click("#import-confirm")
    s.wait_js("() => window.__lowmag.annotationLoad?.count === 4")
    page.wait_for_timeout(500)  # any stray request would go out now
    assert deletes == []
    page.reload()
    s.wait_js("() => window.__lowmag.annotationLoad?.count === 4")
    ids = {a["id"] for a in server_annotations(s, cases["slide_draw"])}
    assert mine["id"] in ids and len(ids) == 4
    s.shot("merged")

    # Replace needs its own confirmation; without it nothing changes.
    page.click("#import-open")
    page.set_input_files("#import-geojson", str(upload))
    page.check("input[name=mode][value=replace]")
    page.click("#import-confirm")
    page.wait_for_selector("#import-error:not([hidden])")
    assert "confirm" in page.inner_text("#import-error")
    assert len(server_annotations(s, cases["slide_draw"])) == 4
    page.check("#import-replace-confirm")
    page.click("#import-confirm")
    s.wait_js("() => window.__lowmag.annotationLoad?.count === 3")
    after = {a["id"] for a in server_annotations(s, cases["slide_draw"])}
    assert len(after) == 3 and not after & ids
    clear_slide(s, cases["slide_draw"])  # leave the slide empty for the other tests
    assert s.errors == [], s.errors


@pytest.mark.parametrize("tool", ["rectangle", "polygon", "freehand", "point"])
def test_undo_and_redo_of_create_edit_and_delete(session, cases, tool):
    s = session(f"undo-{tool}")
    page = s.page
    slide = cases["slide_draw"]
    s.login("path_a")
    open_case(s, cases["case_draw"])
    page.click(f"[data-tool={tool}]")
    draw(s, tool)
    [created] = live_count(s, slide, 1, f"after drawing a {tool}")
    assert created["classification"]["name"] == "Tumor"
    # The tool stays armed: a second shape, not a pan; a class key does not recolour it.
    assert page.locator(f"[data-tool={tool}].active").count() == 1
    page.keyboard.press("2")
    draw(s, tool, dx=-150, dy=-100)
    rows = live_count(s, slide, 2, f"after a second {tool}")
    assert sorted(r["classification"]["name"] for r in rows) == ["Stroma", "Tumor"]
    page.keyboard.press("Control+z")  # undo the second create
    [left] = live_count(s, slide, 1, "after undoing the second shape")
    assert left["id"] == created["id"]
    page.keyboard.press("Control+Shift+z")  # redo it
    live_count(s, slide, 2, "after redo")
    page.keyboard.press("Control+z")
    live_count(s, slide, 1, "after undoing again")

    # Edit: select the first shape and change its class; undo and redo the edit.
    page.keyboard.press("v")
    page.evaluate(f"() => window.__lowmag.annotations.anno.setSelected('{_local_id(page)}')")
    page.keyboard.press("3")
    wait_until(
        lambda: server_annotations(s, slide)[0]["classification"]["name"] == "Immune cells",
        what="the class change saved",
    )
    page.keyboard.press("Escape")
    page.click("#undo")
    wait_until(
        lambda: server_annotations(s, slide)[0]["classification"]["name"] == "Tumor",
        what="the class change undone",
    )
    page.click("#redo")
    wait_until(
        lambda: server_annotations(s, slide)[0]["classification"]["name"] == "Immune cells",
        what="the class change redone",
    )

    # Delete, undo the delete (the shape comes back), redo it, undo once more.
    page.evaluate(f"() => window.__lowmag.annotations.anno.setSelected('{_local_id(page)}')")
    page.keyboard.press("Delete")
    live_count(s, slide, 0, "after delete")
    page.keyboard.press("Control+z")
    [back] = live_count(s, slide, 1, "after undoing the delete")
    assert back["classification"]["name"] == "Immune cells"
    page.keyboard.press("Control+y")
    live_count(s, slide, 0, "after redoing the delete")
    page.keyboard.press("Control+z")
    live_count(s, slide, 1, "after undoing the delete again")
    page.reload()
    s.wait_js("() => window.__lowmag.annotationLoad?.count === 1")
    s.shot("after-undo-redo")
    clear_slide(s, slide)
    assert s.errors == [], s.errors


def _local_id(page) -> str:
    return page.evaluate("() => window.__lowmag.annotations.anno.getAnnotations()[0].id")


# ---------------------------------------------------------------- what the case is about


def test_clinical_question_and_failed_analysis_are_shown(session, cases):
    s = session("context")
    page = s.page
    s.login("path_a")
    row = page.locator(f"tr[data-case='{cases['case_sign']}']")
    assert CLINICAL_QUESTION[:40] in row.inner_text()
    failed_row = page.locator(f"tr[data-case='{cases['case_failed']}']")
    assert "AI failed" in failed_row.inner_text()
    assert "no tissue" in failed_row.locator(".badge.failed").get_attribute("title")
    s.shot("worklist")

    page.goto(s.url(f"/cases/{cases['case_sign']}/"))
    assert CLINICAL_QUESTION in page.inner_text("#clinical-question")
    page.goto(s.url(f"/cases/{cases['case_failed']}/"))
    page.wait_for_selector("#analysis-failed:not([hidden])")
    assert "no tissue found" in page.inner_text("#analysis-failed")
    assert "tissue stage" in page.inner_text("#analysis-failed")
    assert page.locator("#no-prediction").is_hidden()
    assert "AI analysis failed" in page.inner_text("#ai-suggestion")
    assert page.locator("#analysis-retry").is_hidden()  # pathologists do not retry
    s.shot("failed-analysis")
    assert s.errors == [], s.errors

    admin = session("admin")
    admin.login("admin_a")
    admin.page.goto(admin.url(f"/cases/{cases['case_failed']}/"))
    admin.page.click("#analysis-retry")
    admin.page.wait_for_selector("#toast:has-text('queued again')")
    jobs = admin.page.request.get(admin.url(f"/api/v1/jobs?slide={cases['slide_failed']}"))
    assert len(jobs.json()["results"]) >= 1
    with __import__("sqlite3").connect(cases["db"]) as db:
        (retries,) = db.execute(
            "SELECT COUNT(*) FROM reviews_auditevent WHERE action = 'job.retry'"
        ).fetchone()
    assert retries == 1


# ---------------------------------------------------------------- second opinions


def _audit_actions(db_path, case_id: int) -> list[str]:
    import sqlite3

    with sqlite3.connect(db_path) as db:
        rows = db.execute(
            "SELECT action FROM reviews_auditevent WHERE case_id = ? ORDER BY id", (case_id,)
        ).fetchall()
    return [r[0] for r in rows]


def test_signing_against_the_ai_prompts_and_a_colleague_answers(session, cases):
    a = session("signer")
    a.login("path_a")
    open_case(a, cases["case_sign"])
    page = a.page
    page.select_option("#diagnosis-call", "benign")
    page.fill("#diagnosis-form textarea[name=diagnosis_text]", "Scar, no residual tumour.")
    page.wait_for_selector("#diagnosis-state:has-text('draft v1')")
    page.click("#sign-button")
    prompt = page.locator("#sign-disagreement")
    assert prompt.is_visible()
    assert "malignant" in prompt.inner_text() and "99%" in prompt.inner_text()
    page.select_option("#sign-colleague", label="path_c")
    a.shot("disagreement-prompt")
    page.fill("#sign-password", PASSWORD)
    page.click("#sign-confirm")
    page.wait_for_selector("#diagnosis-saved:has-text('Second opinion requested from path_c')")
    # Signing locks the annotations in the page at once.
    assert page.locator("[data-tool=rectangle]").is_disabled()
    assert page.locator("#annotations-locked").is_visible()
    assert "disagrees" in page.inner_text("#second-opinion-list")

    c = session("colleague")
    c.login("path_c")
    c.page.click("#inbox-link")
    card = c.page.locator(".opinion[data-opinion]", has_text="S24-0102")
    assert card.count() == 1 and "for path_c" in card.inner_text()
    assert CLINICAL_QUESTION in card.inner_text()
    c.shot("inbox")
    card.locator("textarea[name=answer]").fill("Agree: scar only, margins clear.")
    card.locator("button[type=submit]").click()
    c.page.wait_for_selector(".opinion.done >> text=Opinion sent")
    c.page.reload()
    assert c.page.locator(".opinion[data-opinion]", has_text="S24-0102").count() == 0

    page.goto(a.url("/second-opinions/"))
    answered = page.locator(".opinion.answered", has_text="S24-0102")
    assert "Agree: scar only" in answered.inner_text() and "path_c" in answered.inner_text()
    page.goto(a.url(f"/cases/{cases['case_sign']}/"))
    page.wait_for_selector("#second-opinion-list .answer")
    assert "Agree: scar only" in page.inner_text("#second-opinion-list")
    a.shot("answer-on-case")
    actions = _audit_actions(cases["db"], cases["case_sign"])
    for action in ("second_opinion.open", "second_opinion.assign", "second_opinion.answer"):
        assert action in actions, actions
    assert a.errors == [] and c.errors == [], (a.errors, c.errors)


# ---------------------------------------------------------------- keyboard and zoom

MAG = "() => window.__lowmag.magnification"
CENTRE_X = "() => window.__lowmag.viewer.viewport.getCenter(true).x"


def test_shortcuts_work_after_panel_clicks_and_zoom_has_keys_buttons_presets(session, cases):
    s = session("keys")
    page = s.page
    s.login("path_a")
    open_case(s, cases["case_a"])
    page.wait_for_selector("#gallery .patch")
    page.click("#layer-slide")
    page.click("#layer-slide")  # a checkbox in the side panel now holds the focus
    page.keyboard.press("h")
    assert page.is_checked("#layer-heatmap")
    page.click("#heatmap-opacity")  # a slider holds the focus
    page.keyboard.press("n")
    page.wait_for_selector("#gallery .patch.active")
    page.keyboard.press("h")
    assert not page.is_checked("#layer-heatmap")

    page.click("#zoom-fit")
    s.wait_js("() => window.__lowmag.magnification > 0")
    page.click(".zoombar [data-mag='5']")
    s.wait_js(f"() => Math.abs(({MAG})() - 5) < 0.05")
    assert page.inner_text("#magnification") == "5.0x"
    page.click(".zoombar [data-mag='2']")
    s.wait_js(f"() => Math.abs(({MAG})() - 2) < 0.05")
    page.keyboard.press("Shift+Digit1")
    s.wait_js(f"() => Math.abs(({MAG})() - 1) < 0.05")
    page.click(".zoombar [data-mag='5']")
    s.wait_js(f"() => Math.abs(({MAG})() - 5) < 0.05")
    before = page.evaluate(MAG)
    page.keyboard.press("+")
    s.wait_js(f"() => ({MAG})() > {before} * 1.3")
    page.wait_for_timeout(700)
    after = page.evaluate(MAG)
    page.click("#zoom-out")
    s.wait_js(f"() => ({MAG})() < {after} * 0.9")
    page.click("#zoom-in")
    page.click("#zoom-in")
    page.wait_for_timeout(700)
    x0 = page.evaluate(CENTRE_X)
    page.keyboard.press("ArrowRight")
    s.wait_js(f"() => ({CENTRE_X})() > {x0} + 1e-4")
    page.keyboard.press("-")
    s.shot("zoomed")
    assert s.errors == [], s.errors


# ---------------------------------------------------------------- worklist

ROW_IDS = "() => [...document.querySelectorAll('#worklist-rows tr.case-row')].map((r) => Number(r.dataset.case))"
COLUMN = "(i) => [...document.querySelectorAll('#worklist-rows tr.case-row')].map((r) => r.cells[i].dataset.sort ?? r.cells[i].textContent.trim())"
POST_CASE = """async (body) => {
  const token = document.cookie.match(/csrftoken=([^;]+)/)[1];
  const response = await fetch('/api/v1/cases/', { method: 'POST', body: JSON.stringify(body),
    headers: { 'Content-Type': 'application/json', 'X-CSRFToken': token } });
  return [response.status, await response.json()];
}"""


def test_worklist_bars_waiting_sorting_and_live_cases(session, cases):
    s = session("worklist")
    page = s.page
    s.login("path_a")
    bar = page.locator(f"tr[data-case='{cases['case_draw']}'] .confidence .bar")
    assert 40 <= bar.bounding_box()["width"] <= 50  # 76% of a 60 px track

    server_order = page.evaluate(ROW_IDS)
    page.click("th button.sort:text('Accession')")
    accessions = page.evaluate(COLUMN, 1)
    assert accessions == sorted(accessions)
    assert page.get_attribute("th:has(button:text('Accession'))", "aria-sort") == "ascending"
    page.click("th button.sort:text('Accession')")
    assert page.evaluate(COLUMN, 1) == sorted(accessions, reverse=True)
    page.click("th button.sort:text('Waiting')")
    waits = [int(v) for v in page.evaluate(COLUMN, 7)]
    assert waits == sorted(waits)
    assert sorted(page.evaluate(ROW_IDS)) == sorted(server_order)
    s.shot("sorted")

    admin = session("admin-live")
    admin.login("admin_a")
    with __import__("sqlite3").connect(cases["db"]) as db:
        (cohort_a,) = db.execute("SELECT id FROM cases_cohort WHERE slug = 'skin-a'").fetchone()
    status, created = admin.page.evaluate(
        POST_CASE,
        {"cohort": cohort_a, "patient_id": "P-LIVE", "accession_number": "S24-LIVE"},
    )
    assert status == 201, created
    page.wait_for_selector(f"tr[data-case='{created['id']}']", timeout=8000)
    assert "S24-LIVE" in page.inner_text("#worklist-rows")

    page.goto(s.url("/?queue=signed"))
    waited = page.locator(f"tr[data-case='{cases['case_signed']}'] td[data-waited]")
    assert waited.inner_text() == "signed after 2 h"
    assert int(waited.get_attribute("data-waited")) == 2 * 3600 + 5 * 60
    assert s.errors == [] and admin.errors == [], (s.errors, admin.errors)


def test_worklist_page_and_api_agree_with_600_open_cases(session, cases):
    s = session("many")
    s.login("path_m")
    page_ids = s.page.evaluate(ROW_IDS)
    api_ids: list[int] = []
    url = s.url("/api/v1/worklist/?queue=unsigned&page_size=100")
    while url and len(api_ids) < len(page_ids):
        body = s.page.request.get(url).json()
        api_ids += [c["id"] for c in body["results"]]
        url = body.get("next")
    assert len(page_ids) == 500
    assert page_ids == api_ids[:500]
    accessions = s.page.evaluate(COLUMN, 1)
    # the six urgent cases first, then the longest-waiting routine cases, oldest first
    assert accessions[:6] == [f"M24-{i:04d}" for i in range(7, N_MANY, 100)]
    assert accessions[6:9] == ["M24-0000", "M24-0001", "M24-0002"]


def test_annotations_are_read_only_on_a_signed_case(session, cases):
    s = session("signed-readonly")
    page = s.page
    s.login("path_a")
    open_case(s, cases["case_signed"])
    page.wait_for_selector("#annotations-locked:not([hidden])")
    assert "signed" in page.inner_text("#annotations-locked")
    for tool in ("rectangle", "polygon", "freehand", "point"):
        assert page.locator(f"[data-tool={tool}]").is_disabled()
    assert page.locator("#import-open").is_disabled()
    page.keyboard.press("r")
    assert page.locator("[data-tool=pan].active").count() == 1
    page.mouse.click(*viewer_centre(s))  # a click with the point tool's key pressed earlier
    page.keyboard.press("o")
    page.mouse.click(*viewer_centre(s))
    page.wait_for_timeout(300)
    assert server_annotations(s, cases["slide_signed"]) == []
    assert s.errors == [], s.errors


# ---------------------------------------------------------------- accessibility

AXE = REPO_ROOT / "frontend" / "node_modules" / "axe-core" / "axe.min.js"
RUN_AXE = """async () => {
  const result = await axe.run(document, { runOnly: { type: 'tag', values: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa', 'best-practice'] } });
  return result.violations.filter((v) => ['serious', 'critical'].includes(v.impact))
    .map((v) => `${v.id} (${v.impact}): ${v.nodes.length} x ${v.nodes.slice(0, 3).map((n) => n.target.join(' ')).join(' | ')} ${v.nodes[0]?.failureSummary?.slice(0, 160) || ''}`);
}"""


def _axe(s: Session) -> list[str]:
    s.page.add_script_tag(path=str(AXE))
    return s.page.evaluate(RUN_AXE)


@pytest.mark.skipif(not AXE.exists(), reason="axe-core missing: npm ci in frontend/")
def test_no_serious_accessibility_violations(browser, cases):
    from tests.browser_fixtures import Session as BrowserSession

    s = BrowserSession(browser, cases, "axe")
    s.context.close()  # a context that lets the test inject axe despite the page's CSP
    s.context = browser.new_context(viewport={"width": 1366, "height": 768}, bypass_csp=True)
    s.page = s.context.new_page()
    page = s.page
    try:
        page.goto(s.url("/login/"))
        found = {"login": _axe(s)}
        s.login("path_a")
        found["worklist"] = _axe(s)
        open_case(s, cases["case_a"])
        s.wait_js("() => window.__lowmag.annotations !== undefined")
        page.wait_for_selector("#gallery .patch")
        found["case"] = _axe(s)
        page.goto(s.url("/second-opinions/"))
        found["inbox"] = _axe(s)
        # keyboard: Import is reachable with Tab and shows a focus outline
        page.goto(s.url(f"/cases/{cases['case_draw']}/"))
        s.wait_js("() => window.__lowmag.annotations !== undefined")
        for _ in range(40):
            page.keyboard.press("Tab")
            if page.evaluate("() => document.activeElement.id") == "import-open":
                break
        assert page.evaluate("() => document.activeElement.id") == "import-open"
        outline = page.evaluate("() => getComputedStyle(document.activeElement).outlineStyle")
        assert outline not in ("none", ""), outline
        page.keyboard.press("Enter")
        assert page.locator("#import-dialog").is_visible()
        headings = page.locator("h1").count()
    finally:
        s.close()
    assert all(not v for v in found.values()), found
    assert headings == 1


# ---------------------------------------------------------------- QuPath on the original scan

IMPORT = """async ([slide, body]) => {
  const token = document.cookie.match(/csrftoken=([^;]+)/)[1];
  const response = await fetch(`/api/v1/annotations/import?slide=${slide}`, { method: 'POST',
    body: JSON.stringify(body), headers: { 'Content-Type': 'application/json', 'X-CSRFToken': token } });
  return response.status;
}"""


def test_export_in_the_original_scans_frame(session, cases, tmp_path):
    import openslide

    s = session("export-frame")
    page = s.page
    s.login("path_a")
    open_case(s, cases["case_draw"])
    slide_5x = [(100, 120), (400.5, 610.25)]
    feature = {
        "type": "Feature",
        "geometry": {"type": "LineString", "coordinates": [list(p) for p in slide_5x]},
        "properties": {},
    }
    assert page.evaluate(IMPORT, [cases["slide_draw"], feature]) == 201
    page.select_option("#export-frame", "source")
    with page.expect_download() as download:
        page.click("#export-geojson")
    path = tmp_path / download.value.suggested_filename
    download.value.save_as(path)
    assert path.name == "cmu-1-small-region.geojson"  # named after the original scan
    exported = json.loads(path.read_text())
    frame = exported["lowmag_frame"]
    assert frame["frame"] == "source" and (frame["width"], frame["height"]) == (2220, 2967)
    page.wait_for_selector("#toast:has-text('original scan')")
    # The same places on the original: its own pixel size says where they are.
    with openslide.OpenSlide(str(shared_slide("cmu-1-small-region.svs"))) as original:
        source_mpp = float(original.properties["openslide.mpp-x"])
        assert original.dimensions == (2220, 2967)
    with openslide.OpenSlide(_slide_path(cases, cases["slide_draw"])) as export:
        export_mpp = float(export.properties["openslide.mpp-x"])
        scale = (2220 / export.dimensions[0], 2967 / export.dimensions[1])
    coordinates = exported["features"][0]["geometry"]["coordinates"]
    for (x5, y5), (xs, ys) in zip(slide_5x, coordinates, strict=True):
        assert abs(xs - x5 * scale[0]) <= 1 and abs(ys - y5 * scale[1]) <= 1
        assert abs(xs - x5 * export_mpp / source_mpp) <= 1  # within one source pixel
        assert abs(ys - y5 * export_mpp / source_mpp) <= 1.5  # (the export rounds its height)
    page.select_option("#export-frame", "slide")
    with page.expect_download() as download:
        page.click("#export-geojson")
    plain = json.loads(Path(download.value.path()).read_text())
    assert plain["lowmag_frame"]["frame"] == "slide"
    assert plain["features"][0]["geometry"]["coordinates"] == [list(p) for p in slide_5x]
    clear_slide(s, cases["slide_draw"])
    # A slide that is itself the original records no other frame: a clear refusal.
    refused = page.request.get(
        s.url(f"/api/v1/annotations/export?slide={cases['slide_bulk']}&frame=source")
    )
    assert refused.status == 400 and "not a LowMag export" in refused.text()
    assert s.errors == [], s.errors


def _slide_path(cases, slide_id: int) -> str:
    import sqlite3

    with sqlite3.connect(cases["db"]) as db:
        (file,) = db.execute("SELECT file FROM cases_slide WHERE id = ?", (slide_id,)).fetchone()
    return str(cases["db"].parent / "data" / "slides" / file)


def test_top_regions_have_no_empty_cells_and_clusters_have_a_legend(session, cases):
    s = session("regions")
    page = s.page
    s.login("path_a")
    open_case(s, cases["case_sign"])
    page.wait_for_selector("#gallery .patch")
    scores = [float(t) for t in page.locator("#gallery .patch span").all_inner_texts()]
    assert scores and min(scores) >= 0.05, scores
    page.click("#layer-heatmap")
    page.select_option("#heatmap-layer", "clusters")
    page.wait_for_selector("#cluster-legend:not([hidden])")
    items = page.locator("#cluster-legend-items li")
    assert items.count() == 4
    assert "cluster 1" in items.first.inner_text()
    assert page.locator(".heatmap-controls .legend").is_hidden()
    s.shot("cluster-legend")
    assert s.errors == [], s.errors


def test_two_tabs_on_one_draft_keep_both_texts(session, cases):
    s = session("tabs")
    s.login("path_a")
    first = s.page
    second = s.context.new_page()
    second.on("pageerror", lambda e: s.errors.append(str(e)))
    url = s.url(f"/cases/{cases['case_draw']}/")
    first.goto(url)
    second.goto(url)
    for page in (first, second):
        page.wait_for_selector("#diagnosis-state:has-text('not started')")
    text = "#diagnosis-form textarea[name=diagnosis_text]"
    first.fill(text, "Written in the first tab.")
    first.wait_for_selector("#diagnosis-state:has-text('draft v1')")
    second.fill(text, "Written in the second tab.")
    second.wait_for_selector("#draft-conflict:not([hidden])")
    assert "Written in the first tab." in second.inner_text("#draft-conflict")
    assert second.input_value(text) == "Written in the second tab."  # not lost
    s.shot("draft-conflict")
    second.click("#draft-keep-mine")
    second.wait_for_selector("#diagnosis-saved:has-text('draft saved')")
    drafts = second.request.get(s.url(f"/api/v1/diagnoses?case={cases['case_draw']}")).json()
    assert [d["diagnosis_text"] for d in drafts["results"]] == ["Written in the second tab."]
    assert s.errors == [], s.errors


def test_missing_and_forbidden_pages_are_styled(session, cases):
    s = session("errors")
    s.login("path_b")
    response = s.page.goto(s.url(f"/cases/{cases['case_sign']}/"))  # another cohort's case
    assert response.status == 404
    assert s.page.inner_text("h1").startswith("Not found")
    assert s.page.locator("a:text('Back to the worklist')").count() == 1
    topbar = s.page.evaluate(
        "() => getComputedStyle(document.querySelector('header.topbar')).backgroundColor"
    )
    assert topbar == "rgb(29, 35, 48)"  # the portal's own page and stylesheet, not a bare one


def test_annotation_list_ruler_and_next_case(session, cases):
    s = session("list-ruler")
    page = s.page
    s.login("path_a")
    page.goto(s.url(f"/cases/{cases['case_draw']}/"))
    features = [
        {
            "type": "Feature",
            "geometry": {
                "type": "Polygon",
                "coordinates": [
                    [[100, 100], [200, 100], [200, 200], [150, 220], [100, 200], [100, 100]]
                ],
            },
            "properties": {"name": "margin focus", "classification": {"name": "Tumor"}},
        },
        {
            "type": "Feature",
            "geometry": {"type": "LineString", "coordinates": [[300, 300], [300, 600]]},
            "properties": {},
        },
    ]
    assert (
        page.evaluate(
            IMPORT, [cases["slide_draw"], {"type": "FeatureCollection", "features": features}]
        )
        == 201
    )
    open_case(s, cases["case_draw"])
    items = page.locator("#annotation-list .annotation-item")
    items.first.wait_for()
    mpp = page.evaluate(
        "() => JSON.parse(document.getElementById('viewer-config').textContent).slides[0].mpp"
    )
    texts = sorted(items.all_inner_texts())
    area_mm2 = (100 * 100 + 0.5 * 100 * 20) * mpp * mpp / 1e6
    assert (
        texts[0].startswith("Tumor")
        and f"{area_mm2:.3f} mm²" in texts[0]
        and "margin focus" in texts[0]
    )
    assert texts[1].startswith("unclassified") and f"{round(300 * mpp)} µm" in texts[1]
    zoom = page.evaluate("() => window.__lowmag.viewer.viewport.getZoom(true)")
    page.locator("#annotation-list .annotation-item", has_text="Tumor").click()
    s.wait_js(f"() => window.__lowmag.viewer.viewport.getZoom(true) > {zoom} * 1.5")

    page.keyboard.press("m")
    cx, cy = viewer_centre(s)
    page.mouse.move(cx - 100, cy)
    page.mouse.down()
    page.mouse.move(cx + 100, cy, steps=5)
    page.mouse.up()
    expected = page.evaluate(
        "(mpp) => { const v = window.__lowmag.viewer; const img = v.world.getItemAt(0);"
        " return 200 / img.viewportToImageZoom(v.viewport.getZoom(true)) * mpp; }",
        mpp,
    )
    measured = page.evaluate("() => window.__lowmag.rulerUm")
    assert abs(measured - expected) <= 0.02 * expected, (measured, expected)
    assert "µm" in page.inner_text("#ruler-length")
    assert server_annotations(s, cases["slide_draw"]).__len__() == 2  # a ruler saves nothing
    s.shot("list-and-ruler")
    clear_slide(s, cases["slide_draw"])

    link = page.locator("#next-case")
    assert link.count() == 1 and "Next case" in link.inner_text()
    link.click()
    page.wait_for_url("**/cases/*/")
    assert f"/cases/{cases['case_draw']}/" not in page.url
    assert s.errors == [], s.errors
