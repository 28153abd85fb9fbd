from django.contrib import admin

from portal.reviews.models import Annotation, AuditEvent, Diagnosis, SecondOpinionRequest


class ReadOnlyAdmin(admin.ModelAdmin):
    """Browse only: no add, change or delete (the rows are write-once)."""

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(AuditEvent)
class AuditEventAdmin(ReadOnlyAdmin):
    list_display = ["created_at", "actor_name", "action", "object_type", "object_id", "case", "ip"]
    list_filter = ["action"]
    search_fields = ["actor_name", "object_id", "case__accession_number"]
    date_hierarchy = "created_at"


@admin.register(Diagnosis)
class DiagnosisAdmin(ReadOnlyAdmin):
    list_display = ["case", "version", "status", "call", "author", "signed_by", "signed_at"]
    list_filter = ["status"]
    search_fields = ["case__accession_number", "call"]


@admin.register(Annotation)
class AnnotationAdmin(admin.ModelAdmin):
    list_display = ["id", "slide", "author", "classification_name", "version", "deleted"]
    list_filter = ["deleted", "classification_name"]


@admin.register(SecondOpinionRequest)
class SecondOpinionRequestAdmin(admin.ModelAdmin):
    list_display = ["case", "status", "requested_by", "assigned_to", "created_at"]
    list_filter = ["status"]
