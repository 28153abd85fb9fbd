from django.contrib import admin

from portal.uploads.models import Upload


@admin.register(Upload)
class UploadAdmin(admin.ModelAdmin):
    list_display = ("id", "filename", "user", "case", "offset", "length", "completed", "duplicate")
    list_filter = ("completed", "duplicate")
    search_fields = ("filename", "sha256", "user__username")
    readonly_fields = ("id", "offset", "sha256", "created_at", "updated_at")
