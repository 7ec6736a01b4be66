"""OpenAI's error envelope, for every error yugongd itself answers."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from yugongd.channel import cork_channel

if TYPE_CHECKING:
    from twisted.web.server import Request

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "requests",
    502: "upstream_error",
    503: "server_error",
    504: "upstream_error",
}


def error_body(status: int, code: str, message: str, type_: str | None = None) -> bytes:
    """The JSON bytes of an OpenAI error envelope."""
    doc = {
        "error": {
            "message": message,
            "type": type_ or _TYPES.get(status, "server_error"),
            "param": None,
            "code": code,
        }
    }
    return json.dumps(doc).encode("utf-8")


def sse_error_event(code: str, message: str) -> bytes:
    """The final event of a stream that the upstream broke off: never a silent cut."""
    return b"data: " + error_body(502, code, message) + b"\n\n"


def write_json(request: Request, status: int, body: bytes) -> None:
    """Answer ``request`` with a complete JSON response (``request`` must still be open)."""
    request.setResponseCode(status)
    request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
    request.responseHeaders.setRawHeaders(b"content-length", [str(len(body)).encode()])
    channel = cork_channel(request)  # head and body in one send
    try:
        request.write(body)
        request.finish()
    finally:
        if channel is not None:
            channel.uncork()


def write_error(
    request: Request,
    status: int,
    code: str,
    message: str,
    retry_after: float | None = None,
    type_: str | None = None,
) -> None:
    """Answer ``request`` with an OpenAI-style error."""
    if retry_after is not None:
        seconds = max(1, int(retry_after + 0.999))
        request.responseHeaders.setRawHeaders(b"retry-after", [str(seconds).encode()])
    write_json(request, status, error_body(status, code, message, type_))
