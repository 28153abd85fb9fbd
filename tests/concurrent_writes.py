"""Sign and amend while eight clients write annotations: the workload behind test_concurrency.

Runs against whatever database Django is configured with. ``python -m tests.concurrent_writes``
migrates a fresh database first (the SQLite case: a real file, as the embedded portal uses).
"""

from __future__ import annotations

import json
import threading
import time

WRITERS = 8
AMENDS = 3
PASSWORD = "histology-is-fun-42"


def _seed():
    from django.contrib.auth import get_user_model

    from portal.cases.models import Case, Cohort, Membership, Slide
    from portal.reviews.models import Diagnosis

    users = get_user_model().objects
    cohort = Cohort.objects.create(name="Busy", slug="busy")
    signer = users.create_user("signer", "s@example.org", PASSWORD)
    writer = users.create_user("writer", "w@example.org", PASSWORD)
    for user in (signer, writer):
        Membership.objects.create(user=user, cohort=cohort, role="pathologist")
    cases = []
    for accession in ("SIGNED-1", "OPEN-1"):
        case = Case.objects.create(
            cohort=cohort, patient_id="P-" + accession, accession_number=accession, status="ready"
        )
        Slide.objects.create(
            case=case,
            original_name=f"{accession}.tiff",
            file=f"{accession}/{accession}.tiff",
            sha256="ab" * 32,
            status="ready",
            width=4000,
            height=3000,
        )
        cases.append(case)
    draft = Diagnosis.objects.create(case=cases[0], author=signer, call="tumor", version=1)
    return signer, writer, draft, cases[1].slides.get()


def _client_for(user):
    from rest_framework.test import APIClient

    client = APIClient()
    client.force_authenticate(user)
    return client


def sign_and_amend_while_writing(writers: int = WRITERS) -> dict:
    """Status codes of one sign and ``AMENDS`` amends, and of the annotation writes meanwhile."""
    from django.db import connections

    signer, writer, draft, slide = _seed()
    stop = threading.Event()
    write_codes: list[int] = []

    def write_annotations():
        client = _client_for(writer)
        try:
            while not stop.is_set():
                response = client.post(
                    "/api/v1/annotations/",
                    {"slide": slide.pk, "geometry": {"type": "Point", "coordinates": [10, 20]}},
                    format="json",
                )
                write_codes.append(response.status_code)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=write_annotations) for _ in range(writers)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)  # the writers are busy
        client = _client_for(signer)
        signed = client.post(
            f"/api/v1/diagnoses/{draft.pk}/sign/", {"password": PASSWORD}, format="json"
        )
        codes = {"sign": [signed.status_code], "amend": [], "bodies": []}
        if signed.status_code != 200:
            codes["bodies"].append(signed.content[:200].decode("utf-8", "replace"))
        latest = draft.pk
        for i in range(AMENDS):
            amended = client.post(
                f"/api/v1/diagnoses/{latest}/amend/",
                {"password": PASSWORD, "reason": f"addendum {i}", "call": "normal"},
                format="json",
            )
            codes["amend"].append(amended.status_code)
            if amended.status_code == 201:
                latest = amended.json()["id"]
            else:
                codes["bodies"].append(amended.content[:200].decode("utf-8", "replace"))
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    codes["writes"] = write_codes
    return codes


def main() -> None:
    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command

    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    call_command("migrate", verbosity=0)
    print(json.dumps(sign_and_amend_while_writing()))


if __name__ == "__main__":
    main()
