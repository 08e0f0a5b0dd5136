"""The OpenAI (and Anthropic) routes the front server forwards to an engine, and the check of a
request's path.

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
    # Anthropic's Messages API (anthropic.py repairs what the engine's version gets wrong)
    "messages": JSON,
}
# GET /v1/models is an OpenAI route vLLM serves too; the front server answers it for every lane.
ANSWERED_HERE = ("models",)
# POST, answered here from the lane's tokenizer (vLLM 0.12 does not serve it; 0.32 does and
# answers it when its lane is loaded): anthropic.count_tokens.
COUNT_TOKENS = "messages/count_tokens"
ANTHROPIC_ROUTES = ("messages", COUNT_TOKENS)
# /v1/responses/{id}, /v1/responses/{id}/cancel, /v1/responses/{id}/input_items carry no model:
# answered here (stored responses are not kept: a switch would lose them)
_RESPONSE_BY_ID = re.compile(r"responses/[^/]+(/cancel|/input_items)?")

_ENCODED_SEPARATOR = re.compile(r"%(2f|2e|5c)", re.IGNORECASE)


def forwarded_route(raw_path: bytes) -> str | None:
    """The FORWARDED key (or COUNT_TOKENS) of a request path as sent (percent-encoded, no
    query), or None."""
    route = _route(raw_path)
    return route if route in FORWARDED or route == COUNT_TOKENS else None


def response_by_id(raw_path: bytes) -> bool:
    """A path of OpenAI's stored responses (by id), which this server does not keep."""
    route = _route(raw_path)
    return route is not None and _RESPONSE_BY_ID.fullmatch(route) is not None


def _route(raw_path: bytes) -> str | None:
    """The path under /v1/, checked and decoded, or None."""
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
    return route
