"""The Graph API's error answers as the emulator gives them: ``ApiError`` raised by handlers and
turned into the ``{"error": {...}}`` JSON body with its status and headers."""

from __future__ import annotations

import json

from aiohttp import web


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        code: int,
        subcode: int | None = None,
        kind: str = "MLYApiException",
        transient: bool | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.subcode = status, message, code, subcode
        self.kind, self.transient, self.headers = kind, transient, headers or {}


def invalid_token() -> ApiError:
    return ApiError(500, "Invalid OAuth 2.0 Access Token", 190, kind="OAuthException")


def unknown_id(image_id: str) -> ApiError:
    return ApiError(
        400,
        f"Unsupported get request. Object with ID '{image_id}' does not exist, cannot be loaded "
        "due to missing permissions, or does not support this operation",
        100,
        33,
    )


def error_response(error: ApiError, trace_id: str) -> web.Response:
    body: dict = {"message": error.message, "type": error.kind, "code": error.code}
    if error.subcode is not None:
        body["error_subcode"] = error.subcode
    if error.transient is not None:
        body["is_transient"] = error.transient
    body["fbtrace_id"] = trace_id
    return web.Response(
        status=error.status,
        body=json.dumps({"error": body}).encode(),
        content_type="application/json",
        headers=error.headers,
    )
