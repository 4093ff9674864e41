"""The example's URLs: the login and logout pages (Django's own views), the chat page, and the admin."""

from chatroom import views
from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import path
from django.views.generic import RedirectView

urlpatterns = [
    path("", RedirectView.as_view(url="/chat/")),
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("chat/", views.chat, name="chat"),
    path("admin/", admin.site.urls),
]
