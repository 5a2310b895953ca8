"""A one-file Django app for tests/test_apps_wsgi.py."""

from __future__ import annotations

import django
from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import path

settings.configure(
    DEBUG=False, SECRET_KEY="test-only", ROOT_URLCONF=__name__, ALLOWED_HOSTS=["*"],
    MIDDLEWARE=[], INSTALLED_APPS=[],
)
django.setup()


def hello(request: HttpRequest) -> HttpResponse:
    return HttpResponse("Hello from Django")


def form(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"method": request.method, "name": request.POST.get("name"),
                         "q": request.GET.get("q"), "script": request.META.get("SCRIPT_NAME")})


urlpatterns = [path("", hello), path("form", form)]

from django.core.wsgi import get_wsgi_application  # noqa: E402

app = get_wsgi_application()
