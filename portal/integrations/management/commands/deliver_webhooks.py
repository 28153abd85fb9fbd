"""``manage.py deliver_webhooks``: attempt the webhook deliveries that are due (run it periodically)."""

from __future__ import annotations

from django.core.management.base import BaseCommand

from portal.integrations.webhooks import deliver_due


class Command(BaseCommand):
    help = "Attempt pending webhook deliveries whose next attempt is due."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--limit", type=int, default=100, help="at most this many deliveries")

    def handle(self, *args, limit: int, **options) -> None:
        counts = deliver_due(limit=limit)
        summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        self.stdout.write(summary or "no deliveries due")
