"""``manage.py create_user NAME --role admin|pathologist|integration [--cohort C ...]``."""

from __future__ import annotations

import getpass
import os
import sys

from django.contrib.auth import get_user_model
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from portal.cases.models import Cohort, Membership

ROLES = ("admin", "pathologist", "integration")


class Command(BaseCommand):
    help = (
        "Create a user with a role. Pathologists and integrations belong to cohorts (--cohort, "
        "repeatable). The password comes from --password, $LOWMAG_PASSWORD, or a prompt; "
        "integration users get none (give them a token with create_token)."
    )

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--role", choices=ROLES, required=True)
        parser.add_argument("--cohort", action="append", default=[], help="cohort name or slug")
        parser.add_argument("--email", default="")
        parser.add_argument("--password", default=None)

    def handle(self, *args, username, role, cohort, email, password, **options):
        User = get_user_model()
        if User.objects.filter(username=username).exists():
            raise CommandError(f"user {username!r} already exists")
        if role != "admin" and not cohort:
            raise CommandError(f"a {role} must belong to at least one cohort: add --cohort NAME")
        cohorts = [self._cohort(name) for name in cohort]
        password = None if role == "integration" else self._password(password)
        with transaction.atomic():
            user = User.objects.create_user(
                username, email, password, is_staff=role == "admin", is_superuser=role == "admin"
            )
            for c in cohorts:
                Membership.objects.create(
                    user=user, cohort=c, role=role if role != "admin" else "pathologist"
                )
        where = f" in {', '.join(c.name for c in cohorts)}" if cohorts else ""
        self.stdout.write(f"Created {role} {username}{where}.")

    @staticmethod
    def _cohort(name: str) -> Cohort:
        found = Cohort.objects.filter(name=name).first() or Cohort.objects.filter(slug=name).first()
        if found is None:
            raise CommandError(
                f"no cohort named {name!r}; create it in the admin or with import_cohort"
            )
        return found

    @staticmethod
    def _password(given: str | None) -> str:
        password = given or os.environ.get("LOWMAG_PASSWORD")
        if not password:
            if not sys.stdin.isatty():
                raise CommandError("no password: pass --password or set LOWMAG_PASSWORD")
            password = getpass.getpass("Password: ")
        try:
            validate_password(password)
        except ValidationError as exc:
            raise CommandError("password refused: " + " ".join(exc.messages)) from exc
        return password
