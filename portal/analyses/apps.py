from django.apps import AppConfig


class AnalysesConfig(AppConfig):
    name = "portal.analyses"
    label = "analyses"

    def ready(self) -> None:
        # Tasks outside tasks.py, so that workers know them.
        from portal.analyses import extraction, shadow, training  # noqa: F401
