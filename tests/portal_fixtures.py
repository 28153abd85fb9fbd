"""The portal's shared fixture set: two cohorts and one user per role.

- ``admin_user``: staff, sees and manages everything
- ``path_a`` / ``path_b``: pathologists of cohort A / cohort B
- ``integration_a``: the LIS integration of cohort A, with ``integration_token_a`` (raw token)
- ``case_a`` / ``case_b``: one case per cohort, each with a ready slide (``slide_a``/``slide_b``;
  no real file behind it)
- ``prediction_a``: an AI prediction ("tumor", 0.9) on ``slide_a``
- ``api_client_for(user)``: a DRF APIClient authenticated as ``user`` (None: anonymous);
  ``api_client_for(user, token=raw)`` sends ``Authorization: Token raw`` instead;
  ``lis_client``: the one of ``integration_a``
- ``storage``: slides and uploads in the test's own temporary folder (``tmp_path/slides``,
  ``tmp_path/uploads``); returns ``tmp_path``

Every user's password is ``PASSWORD``.
"""

from __future__ import annotations

import numpy as np
import pytest

PASSWORD = "histology-is-fun-42"


@pytest.fixture(scope="session", autouse=True)
def _fast_password_hashing():
    """PBKDF2's default cost makes each test user take most of a second on small machines."""
    from django.test.utils import override_settings

    with override_settings(PASSWORD_HASHERS=["django.contrib.auth.hashers.MD5PasswordHasher"]):
        yield


def make_user(username: str, *, cohort=None, role: str = "pathologist", staff: bool = False):
    from django.contrib.auth import get_user_model

    from portal.cases.models import Membership

    user = get_user_model().objects.create_user(
        username, f"{username}@example.org", PASSWORD, is_staff=staff, is_superuser=staff
    )
    if cohort is not None:
        Membership.objects.create(user=user, cohort=cohort, role=role)
    return user


def make_case(cohort, accession: str, *, created_by=None):
    from portal.cases.models import Case, Slide

    case = Case.objects.create(
        cohort=cohort,
        patient_id=f"P-{accession}",
        accession_number=accession,
        clinical_question="Lesion?",
        status="ready",
        created_by=created_by,
    )
    Slide.objects.create(
        case=case,
        original_name=f"{accession}.tiff",
        file=f"{accession}/{accession}.tiff",
        sha256=(accession.encode().hex() + "0" * 64)[:64],
        size_bytes=1000,
        vendor="generic-tiff",
        mpp=2.0,
        magnification=5.0,
        width=4000,
        height=3000,
        level_count=3,
        status="ready",
    )
    return case


@pytest.fixture
def cohort_a(db):
    from portal.cases.models import Cohort

    return Cohort.objects.create(name="Cohort A", slug="cohort-a")


@pytest.fixture
def cohort_b(db):
    from portal.cases.models import Cohort

    return Cohort.objects.create(name="Cohort B", slug="cohort-b")


@pytest.fixture
def admin_user(db):
    return make_user("admin", staff=True)


@pytest.fixture
def path_a(cohort_a):
    return make_user("path_a", cohort=cohort_a)


@pytest.fixture
def path_b(cohort_b):
    return make_user("path_b", cohort=cohort_b)


@pytest.fixture
def integration_a(cohort_a):
    return make_user("lis_a", cohort=cohort_a, role="integration")


@pytest.fixture
def integration_token_a(integration_a) -> str:
    from portal.api.models import ApiToken

    _token, raw = ApiToken.issue(integration_a, "LIS of cohort A")
    return raw


@pytest.fixture
def case_a(cohort_a, integration_a):
    return make_case(cohort_a, "A-001", created_by=integration_a)


@pytest.fixture
def case_b(cohort_b):
    return make_case(cohort_b, "B-001")


@pytest.fixture
def slide_a(case_a):
    return case_a.slides.get()


@pytest.fixture
def slide_b(case_b):
    return case_b.slides.get()


@pytest.fixture
def model_version(db):
    from portal.analyses.models import ModelVersion

    return ModelVersion.objects.create(
        name="gltrans-demo",
        version="1.0",
        task="lesion-detection",
        classes=["normal", "tumor"],
        magnification=5.0,
        bundle_path="bundles/gltrans-demo-1.0",
        sha256="ab" * 32,
        is_demo=True,
        active=False,  # no weights behind it: such a version can never be active
    )


def make_prediction(slide, model_version, predicted_class: str = "tumor", confidence=0.9):
    from portal.analyses.models import AnalysisJob, Prediction

    job = AnalysisJob.objects.create(
        slide=slide,
        model_version=model_version,
        idempotency_key=AnalysisJob.key_for(slide.sha256, model_version.sha256),
        state="succeeded",
        progress=1.0,
    )
    other = [c for c in model_version.classes if c != predicted_class][0]
    return Prediction.objects.create(
        job=job,
        slide=slide,
        model_version=model_version,
        probabilities={predicted_class: confidence, other: round(1 - confidence, 6)},
        predicted_class=predicted_class,
        confidence=confidence,
        instance_scores=Prediction.pack_scores(np.linspace(0, 1, 12)),
        grid={"n_rows": 3, "n_cols": 4, "l0_patch_size": 64.0},
        code_version="test",
        input_sha256=slide.sha256,
    )


@pytest.fixture
def prediction_a(slide_a, model_version):
    return make_prediction(slide_a, model_version)


@pytest.fixture
def prediction_b(slide_b, model_version):
    return make_prediction(slide_b, model_version)


@pytest.fixture
def api_client_for(db):
    from rest_framework.test import APIClient

    def build(user=None, token: str | None = None) -> APIClient:
        client = APIClient()
        if token is not None:
            client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
        elif user is not None:
            client.force_authenticate(user)
        return client

    return build


@pytest.fixture
def lis_client(api_client_for, integration_a):
    return api_client_for(integration_a)


@pytest.fixture
def storage(settings, tmp_path):
    settings.UPLOAD_DIR = tmp_path / "uploads"
    settings.SLIDE_DIR = tmp_path / "slides"
    return tmp_path
