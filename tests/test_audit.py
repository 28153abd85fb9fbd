"""The audit trail is append-only: neither the ORM nor the admin nor the API can change it."""

from __future__ import annotations

import pytest
from django.contrib.admin.sites import site
from django.test import RequestFactory

from portal.reviews import audit
from portal.reviews.models import AuditEvent, ImmutableRowError

pytestmark = pytest.mark.django_db


@pytest.fixture
def event(admin_user, case_a):
    request = RequestFactory().get("/", REMOTE_ADDR="10.1.2.3")
    return audit.record(admin_user, "case.view", case_a, request=request, reason="check")


def test_record_captures_actor_object_case_and_ip(event, case_a):
    assert (event.actor_name, event.action) == ("admin", "case.view")
    assert (event.object_type, event.object_id) == ("cases.case", str(case_a.pk))
    assert event.case == case_a
    assert event.ip == "10.1.2.3"
    assert event.details == {"reason": "check"}


def test_an_audit_event_cannot_be_saved_again(event):
    event.action = "nothing.happened"
    with pytest.raises(ImmutableRowError):
        event.save()
    assert AuditEvent.objects.get(pk=event.pk).action == "case.view"


def test_an_audit_event_cannot_be_deleted(event):
    with pytest.raises(ImmutableRowError):
        event.delete()
    assert AuditEvent.objects.filter(pk=event.pk).exists()


def test_audit_events_cannot_be_updated_or_deleted_in_bulk(event):
    with pytest.raises(ImmutableRowError):
        AuditEvent.objects.filter(pk=event.pk).update(action="x")
    with pytest.raises(ImmutableRowError):
        AuditEvent.objects.all().delete()
    with pytest.raises(ImmutableRowError):
        AuditEvent.objects.bulk_update([event], ["action"])
    assert AuditEvent.objects.get(pk=event.pk).action == "case.view"


def test_a_case_with_audit_events_cannot_be_deleted(event, case_a):
    from django.db.models import ProtectedError

    with pytest.raises(ProtectedError):
        case_a.delete()


def test_the_audit_admin_is_read_only(event, admin_user):
    request = RequestFactory().get("/admin/")
    request.user = admin_user
    model_admin = site._registry[AuditEvent]
    assert not model_admin.has_add_permission(request)
    assert not model_admin.has_change_permission(request, event)
    assert not model_admin.has_delete_permission(request, event)


def test_admins_list_audit_events_read_only_through_the_api(
    event, api_client_for, admin_user, case_a
):
    client = api_client_for(admin_user)
    listed = client.get(f"/api/v1/audit-events/?case={case_a.pk}&action=case.view").json()
    assert [e["id"] for e in listed["results"]] == [event.pk]
    for method in ("put", "patch", "delete"):
        response = getattr(client, method)(f"/api/v1/audit-events/{event.pk}/", {}, format="json")
        assert response.status_code == 405


def test_login_is_audited(client, admin_user):
    from tests.portal_fixtures import PASSWORD

    client.post(
        "/api/v1/auth/login", {"username": "admin", "password": PASSWORD}, "application/json"
    )
    assert AuditEvent.objects.filter(action="auth.login", actor=admin_user).count() == 1


def test_on_postgresql_raw_sql_cannot_change_audit_events_or_signed_diagnoses(
    event, path_a, case_a
):
    from django.db import DatabaseError, connection, transaction

    from portal.reviews import signing
    from portal.reviews.models import Diagnosis

    if connection.vendor != "postgresql":
        pytest.skip("the write-once triggers exist on PostgreSQL only")
    signed = signing.do_sign(Diagnosis.objects.create(case=case_a, author=path_a), path_a)
    statements = [
        ("UPDATE reviews_auditevent SET action = 'x' WHERE id = %s", event.pk),
        ("DELETE FROM reviews_auditevent WHERE id = %s", event.pk),
        ("UPDATE reviews_diagnosis SET call = 'x' WHERE id = %s", signed.pk),
    ]
    for sql, pk in statements:
        with pytest.raises(DatabaseError, match="write-once"), transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute(sql, [pk])
