from django.apps import AppConfig


class ViewerConfig(AppConfig):
    name = "portal.viewer"
    label = "viewer"
