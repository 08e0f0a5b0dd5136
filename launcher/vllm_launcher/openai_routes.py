"""The OpenAI routes the front server forwards to an engine, and the check of a request's path.

Only these routes reach an engine, and the path sent upstream is this table's own string, never
the client's: a client path reaches an engine only if it is exactly one of them once harmless
percent-escapes are decoded. Dot segments, empty segments, backslashes and encoded slashes,
dots or backslashes never match (vLLM serves admin endpoints such as /pause and /invocations
beside /v1, so `/v1/../pause` must not become `/pause` on the way).
"""

from __future__ import annotations

import re
from urllib.parse import unquote

JSON = "application/json"
MULTIPART = "multipart/form-data"

# Path under /v1 -> the body it takes. Each is served by vLLM under /v1 (a test checks this
# table against vLLM's own router).
FORWARDED = {
    "chat/completions": JSON, "completions": JSON, "embeddings": JSON, "responses": JSON,
    "rerank": JSON, "score": JSON,
    "audio/transcriptions": MULTIPART, "audio/translations": MULTIPART,
}
# GET /v1/models is an OpenAI route vLLM serves too; the front server answers it for every lane.
ANSWERED_HERE = ("models",)

_ENCODED_SEPARATOR = re.compile(r"%(2f|2e|5c)", re.IGNORECASE)


def forwarded_route(raw_path: bytes) -> str | None:
    """The FORWARDED key of a request path as sent (percent-encoded, no query), or None."""
    try:
        path = raw_path.decode("ascii")
    except UnicodeDecodeError:
        return None
    if not path.startswith("/v1/") or _ENCODED_SEPARATOR.search(path) or "\\" in path:
        return None
    route = unquote(path[len("/v1/"):])
    segments = route.split("/")
    if any(segment in ("", ".", "..") for segment in segments):
        return None
    return route if route in FORWARDED else None
