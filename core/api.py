"""Shared REST building blocks: pagination, the error format, 202 responses for jobs."""
from __future__ import annotations

import logging

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import Http404, JsonResponse
from django.urls import reverse
from django.views.defaults import page_not_found, server_error
from rest_framework import exceptions as drf_exceptions
from rest_framework import status
from rest_framework.pagination import PageNumberPagination
from rest_framework.response import Response

from core.exceptions import LifeboatError

logger = logging.getLogger(__name__)


class Pagination(PageNumberPagination):
    page_size_query_param = "page_size"
    max_page_size = 500


def _first_message(detail) -> str:
    if isinstance(detail, dict):
        for field, value in detail.items():
            msg = _first_message(value)
            return msg if field in ("non_field_errors", "detail") else f"{field}: {msg}"
    if isinstance(detail, list) and detail:
        return _first_message(detail[0])
    return str(detail)


def error_body(code: str, message: str, **extra) -> dict:
    return {"error": {"code": code, "message": message, **extra}}


def exception_handler(exc, context):
    """Every API error is ``{"error": {"code", "message", ...}}`` with the right status."""
    if isinstance(exc, LifeboatError):
        return Response(error_body(exc.code, exc.message, **exc.extra), status=exc.status)
    if isinstance(exc, Http404):
        return Response(error_body("not_found", "Not found."), status=status.HTTP_404_NOT_FOUND)
    if isinstance(exc, DjangoPermissionDenied):
        return Response(error_body("permission_denied", "You do not have permission to do this."), status=403)
    if isinstance(exc, DjangoValidationError):
        detail = exc.message_dict if hasattr(exc, "error_dict") else {"non_field_errors": exc.messages}
        return Response(error_body("invalid", _first_message(detail), fields=detail), status=400)
    if isinstance(exc, drf_exceptions.ValidationError):
        return Response(error_body("invalid", _first_message(exc.detail), fields=exc.detail), status=400)
    if isinstance(exc, drf_exceptions.APIException):
        code = exc.get_codes() if isinstance(exc.get_codes(), str) else exc.default_code
        response = Response(error_body(code, _first_message(exc.detail)), status=exc.status_code)
        if getattr(exc, "wait", None):
            response["Retry-After"] = str(int(exc.wait))
        if isinstance(exc, (drf_exceptions.NotAuthenticated, drf_exceptions.AuthenticationFailed)):
            response["WWW-Authenticate"] = 'Token realm="api"'
        return response
    logger.exception("Unhandled API error", exc_info=exc)
    return Response(
        error_body("server_error", "An unexpected error occurred; it has been logged."),
        status=status.HTTP_500_INTERNAL_SERVER_ERROR,
    )


def accepted_job(request, job, serializer_class) -> Response:
    """202 Accepted with the job in the body and a Location header to poll."""
    body = serializer_class(job, context={"request": request}).data
    path = reverse("api:job-detail", args=[job.id])
    location = request.build_absolute_uri(path if path.endswith("/") else path + "/")
    return Response(body, status=status.HTTP_202_ACCEPTED, headers={"Location": location})


def not_found_view(request, exception=None):
    """404 for the whole site: JSON under /api/, the portal's page elsewhere."""
    if request.path.startswith("/api/"):
        return JsonResponse(error_body("not_found", f"There is no API resource at {request.path}."), status=404)
    return page_not_found(request, exception)


def server_error_view(request):
    if request.path.startswith("/api/"):
        return JsonResponse(error_body("server_error", "An unexpected error occurred; it has been logged."), status=500)
    return server_error(request)
