from django.urls import path

from portal.uploads import views

app_name = "uploads"

urlpatterns = [
    path("", views.UploadCollectionView.as_view(), name="collection"),
    path("<uuid:upload_id>", views.UploadView.as_view(), name="upload"),
    path("<uuid:upload_id>/status", views.UploadStatusView.as_view(), name="status"),
]
