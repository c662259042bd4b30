"""The OpenAPI 3.1 document, generated from the route table and the very Structs that
decode requests and encode responses (so it cannot drift from what the server does)."""

from __future__ import annotations

import types
import typing
from typing import Any

import msgspec

from .. import __version__
from .messages import ErrorBody
from .responses import ERRORS
from .routes import Route

__all__ = ["document"]

_REF = "#/components/schemas/{name}"
_UPLOAD = ("Codes, one a line, or CSV with a header naming `code`. Refused whole (422) if blank or not "
           "text: a NUL byte, bytes that are not UTF-8, over 5 % control characters in the first 64 KiB.")
_SECURITY = {"distributor": [{"distributor": []}], "admin": [{"admin": []}], "none": []}


def _query_parameters(query: type) -> list[dict[str, Any]]:
    out = []
    for f in msgspec.structs.fields(query):
        schema = msgspec.json.schema(f.type)
        schema.pop("$defs", None)
        out.append({"name": f.encode_name, "in": "query", "required": f.required, "schema": schema})
    return out


def _members(t: Any) -> tuple[Any, ...]:
    """The types of a union answer (one or the other), else just *t*."""
    return typing.get_args(t) if isinstance(t, types.UnionType) else (t,)


def document(routes: list[Route]) -> dict[str, Any]:
    """The OpenAPI document of *routes*."""
    named: list[Any] = [ErrorBody]
    for r in routes:
        if r.body is not None:
            named.append(r.body)
        named += [m for t in r.out.values() if t not in (str, dict) for m in _members(t)]
    schemas, components = msgspec.json.schema_components(named, ref_template=_REF)
    for t in named:  # what a type checks beyond its fields (see messages.SkuCreate)
        if isinstance(t, type) and getattr(t, "__schema_extra__", None):
            components[t.__name__].update(t.__schema_extra__)
    by_id = dict(zip(map(id, named), schemas))

    def schema_of(t: Any) -> dict[str, Any]:
        parts = [by_id[id(m)] for m in _members(t)]
        return parts[0] if len(parts) == 1 else {"oneOf": parts}

    error = {"description": "an error: " + ", ".join(sorted({f"{c} ({s})" for s, c in ERRORS.values()})),
             "content": {"application/json": {"schema": schema_of(ErrorBody)}}}
    paths: dict[str, dict[str, Any]] = {}
    for r in routes:
        op: dict[str, Any] = {"operationId": r.handler.__name__, "summary": r.summary,
                              "tags": [r.template.split("/")[1] if r.auth != "none" else "operations"],
                              "security": _SECURITY[r.auth]}
        params = [{"name": name, "in": "path", "required": True, "schema": {"type": "string", "pattern": f"^{pat}$"}}
                  for name, pat in r.params]
        if r.query is not None:
            params += _query_parameters(r.query)
        if params:
            op["parameters"] = params
        if r.stream:
            # text with a line that is not blank; the server also refuses (422) a body whose
            # first 64 KiB are not text: over 5 % control characters (imports.check_text)
            text = {"schema": {"type": "string", "pattern": r"\S", "description": _UPLOAD}}
            op["requestBody"] = {"required": True, "content": {"text/plain": text, "text/csv": text}}
        elif r.body is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema_of(r.body)}}}
        responses: dict[str, Any] = {}
        for status, t in r.out.items():
            if t is str:
                ctype = ("text/csv" if "export" in r.template else
                         "text/html" if r.template.startswith("/console") else "text/plain")
                content = {ctype: {"schema": {"type": "string"}}}
            elif t is dict:
                content = {"application/json": {"schema": {"type": "object"}}}
            else:
                content = {"application/json": {"schema": schema_of(t)}}
            responses[str(status)] = {"description": r.summary, "content": content}
        if r.auth == "admin":
            roles = " or ".join(sorted(r.roles - {"owner"}) or ["owner"])
            op["x-roles"] = sorted(r.roles | {"owner"})
            op["description"] = f"Admin role needed: {roles} (or owner)" + (
                "; a read is open to every role." if "viewer" in r.roles else ".")
            responses["403"] = {"description": f"forbidden: the token's role is not {roles} (or owner), or a "
                                               "part of the request needs another",
                                "content": {"application/json": {"schema": schema_of(ErrorBody)}}}
        if r.auth != "none":
            responses["default"] = error
        op["responses"] = responses
        paths.setdefault(r.template, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "card-dispatch", "version": __version__,
                 "description": "HTTP API v1 of the card-dispatch daemon. Amounts are integers in minor units."},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "distributor": {"type": "http", "scheme": "bearer", "description": "a distributor's API key"},
                "admin": {"type": "http", "scheme": "bearer",
                          "description": "an admin token: the configured one (owner), or a named one with a role "
                                         "(viewer, operator, finance, owner); see each operation's x-roles"},
            },
        },
    }
