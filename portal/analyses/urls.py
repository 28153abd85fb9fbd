from django.urls import path

from portal.analyses import pages

urlpatterns = [
    path("models/<int:model_id>/", pages.model_card, name="model-card"),
    path(
        "models/<int:model_id>/report/<str:name>.png", pages.report_image, name="model-report-image"
    ),
    path("models/<int:model_id>/activate/", pages.activate_model, name="model-activate"),
    path("models/<int:model_id>/shadow/", pages.start_shadow_page, name="model-shadow-start"),
    path("cohorts/<int:cohort_id>/shadow/", pages.shadow_page, name="shadow-page"),
    path("cohorts/<int:cohort_id>/rollback/", pages.rollback_page, name="cohort-rollback"),
    path("cohorts/<int:cohort_id>/training/", pages.training_page, name="training-page"),
]
