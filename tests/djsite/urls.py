from django.urls import path

from . import views

urlpatterns = [
    path("", views.hello),
    path("café/<str:name>/", views.cafe),
    path("form/", views.form),
    path("login/", views.login_view),
    path("logout/", views.logout_view),
    path("whoami/", views.whoami),
    path("go/", views.go),
    path("stream/", views.stream),
    path("endless/", views.endless),
    path("file/", views.file),
    path("boom/", views.boom),
    path("upload/", views.upload),
]
