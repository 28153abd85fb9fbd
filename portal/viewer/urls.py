from django.urls import path

from portal.viewer import tiles, views

urlpatterns = [
    path("slides/<int:slide_id>.dzi", tiles.slide_dzi, name="slide-dzi"),
    path(
        "slides/<int:slide_id>_files/<int:level>/<int:col>_<int:row>.jpeg",
        tiles.slide_tile,
        name="slide-tile",
    ),
    path(
        "slides/<int:slide_id>/heatmap/<int:prediction_id>.dzi",
        tiles.heatmap_dzi,
        name="heatmap-dzi",
    ),
    path(
        "slides/<int:slide_id>/heatmap/<int:prediction_id>_files/<int:level>/<int:col>_<int:row>.png",
        tiles.heatmap_tile,
        name="heatmap-tile",
    ),
    path(
        "slides/<int:slide_id>/<str:name>.png",
        tiles.associated_image,
        name="slide-associated-image",
    ),
    # Pages and the viewer's helpers.
    path("", views.worklist, name="worklist"),
    path("login/", views.login_view, name="login"),
    path("logout/", views.logout_view, name="logout"),
    path("cases/<int:case_id>/", views.case_page, name="case-page"),
    path("second-opinions/", views.second_opinions, name="second-opinions"),
    path("slides/<int:slide_id>/region.jpeg", views.slide_region, name="slide-region"),
    path(
        "viewer/predictions/<int:prediction_id>/top-regions.json",
        views.prediction_top_k,
        name="prediction-top-regions",
    ),
    path("static/<path:path>", views.static_asset, name="static-asset"),
]
