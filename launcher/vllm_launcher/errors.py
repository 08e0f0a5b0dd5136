"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}`, as a response or as
the SSE event that ends a stream which has already started."""

from __future__ import annotations

import json
import math

from fastapi.responses import Response

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "invalid_request_error", 429: "rate_limit_error"}


class APIError(Exception):
    """An error the server answers with; raised anywhere below a route."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.retry_after = retry_after

    def body(self) -> dict:
        kind = ERROR_TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> Response:
        headers = {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        if self.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return Response(self._json(), status_code=self.status, headers=headers, media_type="application/json")

    def rendered(self) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        """The body and headers of response(), for a plain ASGI answer."""
        body = self._json()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        if self.retry_after is not None:
            headers.append((b"retry-after", str(max(1, math.ceil(self.retry_after))).encode()))
        if self.status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        return body, headers

    def sse_event(self) -> bytes:
        """For a stream already answered with 200: an error event, then the stream ends."""
        return b"data: " + self._json() + b"\n\n"

    def _json(self) -> bytes:
        """ASCII JSON: a message quoting client input (a lone surrogate too) always renders."""
        return json.dumps(self.body()).encode()
