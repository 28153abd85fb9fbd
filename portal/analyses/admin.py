from django.contrib import admin

from portal.analyses.models import AnalysisJob, ModelVersion, Prediction


@admin.register(ModelVersion)
class ModelVersionAdmin(admin.ModelAdmin):
    list_display = ["name", "version", "task", "magnification", "active", "is_demo", "created_at"]
    list_filter = ["active", "is_demo", "task"]
    search_fields = ["name", "version", "sha256"]
    readonly_fields = ["sha256", "manifest", "bundle_path", "created_at", "report"]
    # Marking a version active runs ModelVersion.clean(): weights must verify (sha256).


@admin.register(AnalysisJob)
class AnalysisJobAdmin(admin.ModelAdmin):
    list_display = ["id", "slide", "model_version", "state", "stage", "progress", "created_at"]
    list_filter = ["state"]
    readonly_fields = [f.name for f in AnalysisJob._meta.fields]


@admin.register(Prediction)
class PredictionAdmin(admin.ModelAdmin):
    list_display = ["id", "slide", "model_version", "predicted_class", "confidence", "created_at"]
    exclude = ["instance_scores", "evidence_scores"]
    readonly_fields = [
        f.name
        for f in Prediction._meta.fields
        if f.name not in ("instance_scores", "evidence_scores")
    ]
