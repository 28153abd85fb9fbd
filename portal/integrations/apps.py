from django.apps import AppConfig


class IntegrationsConfig(AppConfig):
    name = "portal.integrations"
    label = "integrations"
