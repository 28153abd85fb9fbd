"""``manage.py create_token USER [--name NAME]``: print a new API token (shown this once)."""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from portal.api.models import ApiToken


class Command(BaseCommand):
    help = "Create an API token for USER and print it. Only its hash is stored: copy it now."

    def add_arguments(self, parser):
        parser.add_argument("user", help="username")
        parser.add_argument("--name", default="", help="what the token is for, e.g. 'LIS'")

    def handle(self, *args, user: str, name: str, **options):
        account = get_user_model().objects.filter(username=user).first()
        if account is None:
            raise CommandError(f"no user named {user!r}; create it with manage.py create_user")
        token, raw = ApiToken.issue(account, name)
        self.stderr.write(
            f"Token {token.prefix}… for {account.username}. It is shown only now; "
            "send it as 'Authorization: Token <token>'."
        )
        self.stdout.write(raw)
