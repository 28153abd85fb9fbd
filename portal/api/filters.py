"""Simple query-parameter filters, declared per view as ``filter_params``, and pagination."""

from __future__ import annotations

from drf_spectacular.plumbing import build_basic_type, build_parameter_type
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter
from rest_framework.exceptions import ValidationError
from rest_framework.filters import BaseFilterBackend
from rest_framework.pagination import PageNumberPagination

MAX_INT = 2**63 - 1


class QueryParamFilter(BaseFilterBackend):
    """``filter_params = {"cohort": ("cohort_id", int), "status": ("status", ["new", ...])}``.

    The value type is ``int``, ``str``, ``bool`` or a list of allowed strings. A value of the
    wrong type answers 400 with a message naming the parameter.
    """

    def filter_queryset(self, request, queryset, view):
        for param, (lookup, kind) in getattr(view, "filter_params", {}).items():
            raw = request.query_params.get(param)
            if raw is None or raw == "":
                continue
            queryset = queryset.filter(**{lookup: self.parse(param, raw, kind)})
        return queryset

    @staticmethod
    def parse(param: str, raw: str, kind):
        if kind is int:
            if not raw.isdigit() or int(raw) > MAX_INT:
                raise ValidationError({param: f"'{raw[:40]}' is not a valid id"})
            return int(raw)
        if kind is bool:
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValidationError({param: "expected true or false"})
            return raw.lower() in ("true", "1")
        if isinstance(kind, list | tuple) and raw not in kind:
            raise ValidationError({param: f"'{raw[:40]}' is not one of {', '.join(kind)}"})
        return raw

    def get_schema_operation_parameters(self, view):
        parameters = []
        for param, (_lookup, kind) in getattr(view, "filter_params", {}).items():
            if kind is int:
                schema = build_basic_type(OpenApiTypes.INT)
                schema["minimum"] = 0
            elif kind is bool:
                schema = build_basic_type(OpenApiTypes.BOOL)
            elif isinstance(kind, list | tuple):
                schema = {"type": "string", "enum": list(kind)}
            else:
                schema = build_basic_type(OpenApiTypes.STR)
            parameters.append(
                build_parameter_type(
                    name=param, schema=schema, location=OpenApiParameter.QUERY, required=False
                )
            )
        return parameters


class Pagination(PageNumberPagination):
    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 500
