"""Shared REST building blocks: pagination, the error format, 202 responses for jobs."""
from __future__ import annotations

import io
import logging

from django.conf import settings
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import RequestDataTooBig, SuspiciousOperation, TooManyFieldsSent
from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import Http404, JsonResponse
from django.shortcuts import render
from django.urls import reverse
from django.views.defaults import page_not_found, server_error
from rest_framework import exceptions as drf_exceptions
from rest_framework import parsers, status
from rest_framework.pagination import PageNumberPagination
from rest_framework.response import Response

from core.exceptions import LifeboatError

logger = logging.getLogger(__name__)


class Pagination(PageNumberPagination):
    page_size_query_param = "page_size"
    max_page_size = 500


class RequestTooLarge(drf_exceptions.APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_code = "too_large"


def _too_large_message() -> str:
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    return f"The request body is too large: the limit is {limit / 1024 / 1024:g} MB."


def _suspicious_answer(exc: SuspiciousOperation) -> tuple[int, str, str]:
    """(status, code, sentence) for a request Django refused before a view could read it."""
    if isinstance(exc, RequestDataTooBig):
        return 413, "too_large", _too_large_message()
    if isinstance(exc, TooManyFieldsSent):
        limit = settings.DATA_UPLOAD_MAX_NUMBER_FIELDS
        return 400, "too_many_fields", f"The request has too many fields: the limit is {limit}."
    return 400, "bad_request", "The request was refused as malformed."


class JSONParser(parsers.JSONParser):
    """DRF's JSON parser, bounded: a body above DATA_UPLOAD_MAX_MEMORY_SIZE is 413 (DRF
    reads the stream itself, so Django's own limit never applies), and JSON nested deeper
    than Python's recursion limit is 400 instead of a RecursionError."""

    def parse(self, stream, media_type=None, parser_context=None):
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        body = stream.read(limit + 1 if limit is not None else -1)
        if limit is not None and len(body) > limit:
            raise RequestTooLarge(_too_large_message())
        try:
            return super().parse(io.BytesIO(body), media_type, parser_context)
        except RecursionError:
            raise drf_exceptions.ParseError("The JSON body is nested too deeply.") from None


def holds_nul(data) -> bool:
    """Whether a NUL character is in any string or key of parsed JSON. PostgreSQL stores none
    in text or jsonb: a free-form value (a DictField, a JSONField) is checked with this before
    it is stored; named fields refuse NUL themselves, with their own message."""
    stack = [data]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            if "\x00" in value:
                return True
        elif isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return False


class FormParser(parsers.FormParser):
    """DRF's urlencoded-form parser with Django's body-size limit (DRF reads the stream itself)."""

    def parse(self, stream, media_type=None, parser_context=None):
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        body = stream.read(limit + 1 if limit is not None else -1)
        if limit is not None and len(body) > limit:
            raise RequestTooLarge(_too_large_message())
        return super().parse(io.BytesIO(body), media_type, parser_context)


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
    if isinstance(exc, SuspiciousOperation):
        status_code, code, message = _suspicious_answer(exc)
        return Response(error_body(code, message), status=status_code)
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


def bad_request_view(request, exception=None):
    """400 for the whole site (413 for a body too large): JSON under /api/, a page elsewhere."""
    if isinstance(exception, SuspiciousOperation):
        status_code, code, message = _suspicious_answer(exception)
    else:
        status_code, code, message = 400, "bad_request", "The request was refused as malformed."
    if request.path.startswith("/api/"):
        return JsonResponse(error_body(code, message), status=status_code)
    return render(request, "400.html", {"message": message}, status=status_code)


def server_error_view(request):
    if request.path.startswith("/api/"):
        return JsonResponse(error_body("server_error", "An unexpected error occurred; it has been logged."), status=500)
    return server_error(request)
