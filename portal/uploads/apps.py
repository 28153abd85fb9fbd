from django.apps import AppConfig


class UploadsConfig(AppConfig):
    name = "portal.uploads"
    label = "uploads"
