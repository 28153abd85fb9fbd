"""Guards on which model a cohort uses: verified weights, no demo model in a clinical cohort,
activation by admins only with a recorded reason, audited, and rollback."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from tests.bundles import make_tiny_bundle

pytestmark = pytest.mark.django_db


@pytest.fixture
def registered(tmp_path, settings):
    """``registered(seed, is_demo)`` -> a ModelVersion registered from a real tiny bundle."""
    from portal.analyses.models import ModelVersion

    settings.BUNDLE_DIR = tmp_path / "bundles"

    def build(seed: int = 0, is_demo: bool = False) -> ModelVersion:
        bundle = make_tiny_bundle(tmp_path / f"src-{seed}", seed=seed, is_demo=is_demo)
        call_command("register_model", str(bundle))
        return ModelVersion.objects.get(version=f"0.0.{seed}")

    return build


def _activate(client, model, cohort, reason="validated on 40 signed cases"):
    body = {"cohort": cohort.pk} if cohort is not None else {}
    if reason is not None:
        body["reason"] = reason
    return client.post(f"/api/v1/models/{model.pk}/activate/", body, format="json")


def test_a_version_without_weights_cannot_be_saved_as_active(db):
    from portal.analyses.lifecycle import ActivationError
    from portal.analyses.models import ModelVersion

    with pytest.raises(ActivationError, match="weights are missing"):
        ModelVersion.objects.create(
            name="ghost",
            version="1",
            task="t",
            classes=["a", "b"],
            magnification=5.0,
            bundle_path="/nowhere",
            sha256="0" * 64,
            active=True,
        )
    assert not ModelVersion.objects.filter(name="ghost").exists()


def test_the_admin_form_refuses_active_without_weights(client, admin_user, model_version):
    from portal.analyses.models import ModelVersion

    client.force_login(admin_user)
    url = f"/admin/analyses/modelversion/{model_version.pk}/change/"
    response = client.post(
        url,
        {
            "name": model_version.name,
            "version": model_version.version,
            "task": model_version.task,
            "classes": '["normal", "tumor"]',
            "magnification": "5.0",
            "is_demo": "on",
            "active": "on",
            "intended_use": "",
            "known_limits": "",
        },
    )
    assert response.status_code == 200  # the form again, with the error
    assert "cannot be active" in response.content.decode()
    assert ModelVersion.objects.get(pk=model_version.pk).active is False


def test_activation_needs_a_reason_and_records_who_and_why(
    api_client_for, admin_user, cohort_a, registered
):
    from portal.analyses.models import ModelActivation
    from portal.reviews.models import AuditEvent

    model = registered()
    admin = api_client_for(admin_user)
    assert _activate(admin, model, cohort_a, reason=None).status_code == 400
    cohort_a.refresh_from_db()
    assert cohort_a.active_model is None

    response = _activate(admin, model, cohort_a)
    assert response.status_code == 200, response.content
    cohort_a.refresh_from_db()
    assert cohort_a.active_model == model
    record = ModelActivation.objects.get(cohort=cohort_a)
    assert (record.activated_by, record.reason) == (admin_user, "validated on 40 signed cases")
    event = AuditEvent.objects.get(action="model.activate")
    assert event.actor == admin_user and event.details["reason"] == record.reason
    assert event.details["cohort"] == cohort_a.pk


def test_pathologists_cannot_activate(api_client_for, path_a, cohort_a, registered):
    from portal.reviews.models import AuditEvent

    model = registered()
    assert _activate(api_client_for(path_a), model, cohort_a).status_code == 403
    cohort_a.refresh_from_db()
    assert cohort_a.active_model is None and not AuditEvent.objects.exists()


def test_a_weights_file_whose_hash_does_not_match_is_refused(
    api_client_for, admin_user, cohort_a, registered
):
    from portal.analyses.models import ModelVersion
    from portal.reviews.models import AuditEvent

    model = registered()
    weights = Path(model.bundle_path) / "mil.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte in the weights
    weights.write_bytes(bytes(data))

    response = _activate(api_client_for(admin_user), model, cohort_a)
    assert response.status_code == 409
    assert "do not verify" in response.json()["detail"]
    cohort_a.refresh_from_db()
    assert cohort_a.active_model is None
    assert ModelVersion.objects.get(pk=model.pk).active is False
    assert not AuditEvent.objects.exists()


def test_weights_replaced_consistently_still_do_not_match_the_registration(
    api_client_for, admin_user, cohort_a, registered, tmp_path
):
    """A swapped bundle that is self-consistent is still not the registered one."""
    import shutil

    model = registered(seed=0)
    other = make_tiny_bundle(tmp_path / "other", seed=5, is_demo=False)
    for name in ("mil.safetensors", "manifest.json"):
        shutil.copy(other / name, Path(model.bundle_path) / name)
    response = _activate(api_client_for(admin_user), model, cohort_a)
    assert response.status_code == 409
    assert "does not match the one recorded" in response.json()["detail"]


def test_a_demo_model_cannot_go_to_a_clinical_cohort(
    api_client_for, admin_user, cohort_a, cohort_b, registered
):
    from portal.cases.models import Cohort

    demo = registered(seed=1, is_demo=True)
    admin = api_client_for(admin_user)
    response = _activate(admin, demo, cohort_a)
    assert response.status_code == 409
    assert "demo model" in response.json()["detail"]
    Cohort.objects.filter(pk=cohort_b.pk).update(is_demo=True)
    assert _activate(admin, demo, cohort_b).status_code == 200


def test_register_model_refuses_a_demo_bundle_for_a_clinical_cohort(tmp_path, settings, cohort_a):
    from portal.analyses.models import ModelVersion

    settings.BUNDLE_DIR = tmp_path / "bundles"
    bundle = make_tiny_bundle(tmp_path / "demo", is_demo=True)
    with pytest.raises(CommandError, match="demo model"):
        call_command("register_model", str(bundle), "--activate", "--cohort", cohort_a.name)
    assert not ModelVersion.objects.exists()


def test_rollback_restores_the_previous_model(api_client_for, admin_user, cohort_a, registered):
    from portal.analyses.lifecycle import ActivationError, activate, rollback
    from portal.reviews.models import AuditEvent

    first, second = registered(seed=0), registered(seed=2)
    activate(first, cohort_a, admin_user, "first clinical model")
    activate(second, cohort_a, admin_user, "better on validation")
    cohort_a.refresh_from_db()
    assert cohort_a.active_model == second
    rollback(cohort_a, admin_user, "more second opinions since")
    cohort_a.refresh_from_db()
    assert cohort_a.active_model == first
    event = AuditEvent.objects.get(action="model.rollback")
    assert event.details["restored"] == first.pk and event.actor == admin_user
    with pytest.raises(PermissionError):
        rollback(cohort_a, None, "no account")
    with pytest.raises(ActivationError, match="reason"):
        rollback(cohort_a, admin_user, "  ")


def test_an_admin_creates_a_demo_cohort_but_cannot_unmark_one_that_runs_a_demo_model(
    api_client_for, admin_user
):
    from portal.analyses.models import ModelVersion
    from portal.cases.models import Cohort

    client = api_client_for(admin_user)
    created = client.post(
        "/api/v1/cohorts/", {"name": "Teaching", "slug": "teaching", "is_demo": True}, format="json"
    )
    assert created.status_code == 201 and created.json()["is_demo"] is True
    cohort = Cohort.objects.get(slug="teaching")
    demo = ModelVersion.objects.create(
        name="demo", version="1", task="t", classes=["a", "b"], magnification=5.0, is_demo=True
    )
    Cohort.objects.filter(pk=cohort.pk).update(active_model=demo)
    refused = client.patch(f"/api/v1/cohorts/{cohort.pk}/", {"is_demo": False}, format="json")
    assert refused.status_code == 400 and "demo model" in refused.json()["is_demo"][0]
    cohort.refresh_from_db()
    assert cohort.is_demo is True
