"""Model card and shadow comparison in a real browser (Debian's Chromium via Playwright).

An admin reads the card and the comparison and activates the candidate with one click; the
cohort's pathologist sees the card but not the shadow results; another cohort's gets 404.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.model_cohort import compared_cohort
from tests.portal_fixtures import PASSWORD

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason=f"{CHROMIUM} missing: apt-get install chromium"
    ),
]


@pytest.fixture
def chromium():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"]
        )
        yield browser
        browser.close()


def _page_for(chromium, live_server, username: str):
    context = chromium.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.goto(f"{live_server.url}/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_load_state()
    return page


def test_model_card_and_shadow_comparison_in_the_browser(
    chromium, live_server, cohort_a, admin_user, path_a, path_b, tmp_path
):
    compared = compared_cohort(cohort_a, admin_user, path_a, tmp_path)
    candidate, url = compared["candidate"], live_server.url
    ARTIFACTS.mkdir(exist_ok=True)

    admin = _page_for(chromium, live_server, "admin")
    assert admin.goto(f"{url}/models/{candidate.pk}/").status == 200
    assert f"{candidate.report['auc_pooled']:.3f}" in admin.inner_text("#validation-report")
    admin.wait_for_function(
        "[...document.querySelectorAll('.plots img')].every(i => i.complete && i.naturalWidth > 0)"
    )
    assert admin.is_visible("#activate-form")
    admin.screenshot(path=str(ARTIFACTS / "model-card-admin.png"), full_page=True)
    assert admin.goto(f"{url}/cohorts/{cohort_a.pk}/shadow/").status == 200
    assert admin.inner_text(".candidate-agreement") == "1.000"
    assert admin.inner_text(".baseline-agreement") == "0.750"
    admin.screenshot(path=str(ARTIFACTS / "shadow-comparison-admin.png"), full_page=True)
    admin.fill("#activate-candidate input[name=reason]", "agrees better in shadow mode")
    admin.click("#activate-candidate button[type=submit]")
    admin.wait_for_selector("#rollback")
    assert f"{candidate} is now the active model" in admin.inner_text(".messages")
    cohort_a.refresh_from_db()
    assert cohort_a.active_model == candidate

    pathologist = _page_for(chromium, live_server, "path_a")
    assert pathologist.goto(f"{url}/models/{candidate.pk}/").status == 200
    assert pathologist.is_visible("#validation-report")
    assert pathologist.locator("#admin-actions").count() == 0
    response = pathologist.goto(f"{url}/cohorts/{cohort_a.pk}/shadow/")
    assert response.status == 403
    assert pathologist.locator(".candidate-agreement").count() == 0

    other = _page_for(chromium, live_server, "path_b")
    assert other.goto(f"{url}/models/{candidate.pk}/").status == 404
    assert other.goto(f"{url}/cohorts/{cohort_a.pk}/shadow/").status == 404
