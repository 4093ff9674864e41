"""The test project's views: each exercises one thing a Django developer relies on."""

import hashlib
import os
from pathlib import Path

from django.contrib import messages
from django.contrib.auth import authenticate, login, logout
from django.http import FileResponse, HttpResponse, HttpResponseForbidden, StreamingHttpResponse
from django.middleware.csrf import get_token
from django.shortcuts import redirect
from django.views.decorators.csrf import csrf_exempt


def hello(request):
    return HttpResponse(f"héllo from {request.build_absolute_uri()}")


def cafe(request, name):
    return HttpResponse(f"{name}|{request.path}|{request.path_info}|{request.GET.get('q', '')}")


def _form_page(request, action):
    return HttpResponse(f'<form method="post" action="{action}"><input type="hidden" name="csrfmiddlewaretoken" '
                        f'value="{get_token(request)}"></form>')


def form(request):
    if request.method == "POST":
        return HttpResponse(f"got {request.POST.get('value', '')}")
    return _form_page(request, "/form/")


def login_view(request):
    if request.method != "POST":
        return _form_page(request, "/login/")
    user = authenticate(request, username=request.POST.get("username"), password=request.POST.get("password"))
    if user is None:
        return HttpResponseForbidden("wrong username or password")
    login(request, user)
    messages.success(request, f"welcome, {user.username}")
    return redirect("/whoami/")


def logout_view(request):
    if request.method != "POST":
        return _form_page(request, "/logout/")
    logout(request)
    return redirect("/whoami/")


def whoami(request):
    said = " ".join(str(message) for message in messages.get_messages(request))
    name = request.user.username if request.user.is_authenticated else "anonymous"
    return HttpResponse(f"{name}|{said}")


def go(request):
    response = redirect("/whoami/")
    response.set_cookie("flavour", "oatmeal raisin")
    return response


def stream(request):
    count, size = int(request.GET.get("n", "3")), int(request.GET.get("size", "5"))

    def chunks():
        for index in range(count):
            yield str(index % 10).encode() * size

    return StreamingHttpResponse(chunks(), content_type="application/octet-stream")


def endless(request):
    """Streams until its client leaves; records in $CROSSROADS_DJANGO_MARKS how many chunks it made."""
    marks = Path(os.environ["CROSSROADS_DJANGO_MARKS"])

    def chunks():
        made = 0
        try:
            while made < 1_000_000:  # 64 GB: no client of the tests reads that far
                made += 1
                yield b"x" * 65536
        finally:
            (marks / "endless-closed").write_text(str(made))

    return StreamingHttpResponse(chunks())


def file(request):
    return FileResponse(open(os.environ["CROSSROADS_DJANGO_FILE"], "rb"), as_attachment=True, filename="big.bin")


def boom(request):
    raise ValueError("this view fails on purpose")


@csrf_exempt
def upload(request):
    """A multipart upload: its size, SHA-256 and where Django kept it (a file on disk past 2.5 MB)."""
    uploaded = request.FILES["file"]
    digest = hashlib.sha256()
    for chunk in uploaded.chunks():
        digest.update(chunk)
    return HttpResponse(f"{uploaded.size} {digest.hexdigest()} {type(uploaded).__name__}")
