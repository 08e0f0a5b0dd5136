"""The Anthropic Messages API (POST /v1/messages, /v1/messages/count_tokens) on the front server.

vLLM serves /v1/messages itself; the front server forwards it like the OpenAI routes (lane by
`model`, queueing, switching) and repairs on the way what the engine's version gets wrong, so
that Anthropic clients (the `anthropic` SDK, Claude Code) can use it. docs/agents.md lists every
repair and translation; each is keyed to the engine's version (REPAIRED_BEFORE): an engine that
gets it right is passed through untouched.

- Errors the front server answers itself on these routes, and the engine's errors, are
  Anthropic-shaped: {"type": "error", "error": {"type": <Anthropic's type>, "message": ...}}.
- A stream waiting for its lane is kept alive with `event: ping` (AnthropicDialect.keepalive).
- count_tokens is answered here from the lane's tokenizer and chat template (files in the model
  directory, read with `tokenizers` and jinja2), without loading or switching a lane; an engine that serves
  it itself (COUNT_TOKENS_SINCE) answers it when its lane is loaded.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from .config import LaneConfig
from .errors import APIError
from .vllm_info import version_tuple

ROUTES = ("messages", "messages/count_tokens")
# vLLM 0.12.0 (measured): its message_start lacks type, role, usage and stop_reason, its stream
# ends with `data: [DONE]`, it refuses content blocks other than text, image, tool_use and
# tool_result, reads a tool_result's id from `id` (Anthropic sends `tool_use_id`), passes a
# list-form tool_result content as Python's repr, and an image's base64 data without its data:
# prefix. vLLM 0.32 (measured) gets all of these right; releases between are not measured and get
# the repairs, which only add what is missing.
REPAIRED_BEFORE = (0, 32)
# vLLM serves /v1/messages/count_tokens itself from 0.32 (measured; 0.12 does not).
COUNT_TOKENS_SINCE = (0, 32)

# HTTP status -> Anthropic's error type (docs.anthropic.com, "Errors"; the SDK's error objects).
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
               403: "permission_error", 404: "not_found_error", 413: "request_too_large",
               429: "rate_limit_error", 500: "api_error", 503: "overloaded_error", 504: "timeout_error",
               529: "overloaded_error"}
KNOWN_TYPES = frozenset(ERROR_TYPES.values())
PING = b'event: ping\ndata: {"type": "ping"}\n\n'
# The end of a complete Anthropic stream: `event: message_stop` / `data: {"type":"message_stop"}`
MESSAGE_STOP_TAIL = b'"message_stop"}\n\n'
# Headers of an Anthropic client passed on to the engine (vLLM reads neither today).
PASSED_HEADERS = (b"anthropic-version", b"anthropic-beta")


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def error_json(status: int, message: str, kind: str | None = None) -> bytes:
    return json.dumps({"type": "error", "error": {"type": kind or error_type(status), "message": message}}).encode()


def repairs_needed(engine_version: str | None) -> bool:
    return version_tuple(engine_version or "0.12.0") < REPAIRED_BEFORE


# ---------------------------------------------------------------- answers

class AnthropicDialect:
    """How the proxy answers on an Anthropic route (proxy.Dialect's interface): Anthropic-shaped
    errors, `event: ping` keep-alives, the engine's errors mapped, and its stream repaired when
    its version needs it."""

    done_event = MESSAGE_STOP_TAIL

    def __init__(self, repair: bool, upstream_headers: dict[str, str] | None = None):
        self.repair = repair
        self.upstream_headers = upstream_headers or {}
        self.whole = False                  # the engine answers whole; the client's stream is made here
        self.stream_content_type: bytes | None = None

    def answer_whole(self) -> None:
        self.whole = True
        self.stream_content_type = b"text/event-stream"

    def rendered(self, error: APIError) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        body = error_json(error.status, error.message)
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        if error.retry_after is not None:
            headers.append((b"retry-after", str(max(1, math.ceil(error.retry_after))).encode()))
        return body, headers

    def sse_error(self, error: APIError) -> bytes:
        return b"event: error\ndata: " + error_json(error.status, error.message) + b"\n\n"

    def keepalive(self, text: str) -> bytes:
        # Anthropic's clients skip pings (and comments); the comment says what the request waits for
        return f": {text}\n\n".encode() + PING

    def body(self, status: int, content: bytes) -> bytes:
        """A whole answer of the engine: an error in Anthropic's shape with Anthropic's type; a
        message that used a tool, stop_reason tool_use (0.12 says end_turn after a named tool)."""
        if status >= 400:
            return engine_error(status, content)
        if not self.repair:
            return content
        try:
            message = json.loads(content)
        except ValueError:
            return content
        return json.dumps(message).encode() if _tool_use_stop(message) else content

    def stream(self):
        return WholeToStream() if self.whole else StreamRepair(self.repair)


def _tool_use_stop(message) -> bool:
    """Anthropic's stop_reason is tool_use whenever the answer calls a tool; True if changed."""
    if isinstance(message, dict) and message.get("stop_reason") == "end_turn" and any(
            isinstance(block, dict) and block.get("type") == "tool_use" for block in message.get("content") or []):
        message["stop_reason"] = "tool_use"
        return True
    return False


def streams_whole(data: dict, engine_version: str | None) -> bool:
    """A stream with a named tool that 0.12 would break (its converter drops the tool input's first
    piece): asked of the engine whole (`stream` false in DATA), streamed to the client from here."""
    choice = data.get("tool_choice")
    if data.get("stream") is True and repairs_needed(engine_version) and isinstance(choice, dict) \
            and choice.get("type") == "tool":
        data["stream"] = False
        return True
    return False


def _event(name: str, data: dict) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


class WholeToStream:
    """The engine's whole message as Anthropic's stream of events (StreamRepair's interface)."""

    def __init__(self):
        self.content = b""

    def feed(self, chunk: bytes) -> bytes:
        self.content += chunk
        return b""

    def close(self) -> bytes:
        try:
            message = json.loads(self.content)
            blocks, usage = message["content"], message.get("usage") or {}
        except (ValueError, KeyError, TypeError):
            return b"event: error\ndata: " + error_json(502, "the engine's answer is not a message") + b"\n\n"
        _tool_use_stop(message)
        start = {key: message.get(key) for key in ("id", "type", "role", "model", "stop_sequence")}
        start.update(content=[], stop_reason=None, usage={"input_tokens": usage.get("input_tokens", 0), "output_tokens": 0})
        events = [_event("message_start", {"type": "message_start", "message": start})]
        shown = [block for block in blocks if block.get("type") != "text" or block.get("text")] or blocks
        for index, block in enumerate(shown):
            if block.get("type") == "tool_use":
                opened = {"type": "tool_use", "id": block.get("id"), "name": block.get("name"), "input": {}}
                delta = {"type": "input_json_delta", "partial_json": json.dumps(block.get("input") or {})}
            else:
                opened, delta = {"type": "text", "text": ""}, {"type": "text_delta", "text": block.get("text") or ""}
            events += [_event("content_block_start", {"type": "content_block_start", "index": index,
                                                      "content_block": opened}),
                       _event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}),
                       _event("content_block_stop", {"type": "content_block_stop", "index": index})]
        events += [_event("message_delta", {"type": "message_delta", "delta": {
                       "stop_reason": message.get("stop_reason"), "stop_sequence": message.get("stop_sequence")},
                       "usage": usage}),
                   _event("message_stop", {"type": "message_stop"})]
        return b"".join(events)


def engine_error(status: int, content: bytes) -> bytes:
    """An engine's error body as Anthropic's: vLLM answers {"type": "error", "error": {"type":
    "NotFoundError", ...}} from its Messages handler and OpenAI's {"error": {"message", "type":
    "Bad Request", "code"}} when request validation fails. Already right: unchanged."""
    try:
        data = json.loads(content)
        error = data["error"]
        message = error["message"] if isinstance(error, dict) else str(error)
    except (ValueError, KeyError, TypeError):
        return error_json(status, content[:2000].decode(errors="replace") or f"the engine answered {status}")
    if data.get("type") == "error" and isinstance(error, dict) and error.get("type") in KNOWN_TYPES:
        return content
    return error_json(status, str(message))


class StreamRepair:
    """An engine's Anthropic SSE stream, event by event (events end with a blank line; a chunk may
    hold part of one or several). Events that need nothing pass as the engine's bytes."""

    def __init__(self, repair: bool):
        self.repair = repair
        self.pending = b""
        self.used_tool = False

    def feed(self, chunk: bytes) -> bytes:
        self.pending += chunk
        if b"\n\n" not in self.pending:
            return b""
        complete, _, self.pending = self.pending.rpartition(b"\n\n")
        return b"".join(self._event(block) for block in complete.split(b"\n\n"))

    def close(self) -> bytes:
        rest, self.pending = self.pending, b""
        return self._event(rest.rstrip(b"\n")) if rest.strip() else b""

    def _event(self, block: bytes) -> bytes:
        if not block.strip():
            return b""
        name, data = None, None
        for line in block.split(b"\n"):
            if line.startswith(b"event:"):
                name = line[6:].strip()
            elif line.startswith(b"data:"):
                data = line[5:].strip()
        if data == b"[DONE]" and self.repair:
            return b""                          # not Anthropic's: its clients fail on it
        if name == b"message_start" and self.repair:
            return self._message_start(block, data)
        if self.repair and name == b"content_block_start" and b'"tool_use"' in (data or b""):
            self.used_tool = True
        if self.repair and self.used_tool and name == b"message_delta" and data and b'"end_turn"' in data:
            event = json.loads(data)
            event["delta"]["stop_reason"] = "tool_use"        # 0.12 says end_turn after a named tool
            return b"event: message_delta\ndata: " + json.dumps(event).encode() + b"\n\n"
        if name == b"error":
            return self._error(block, data)
        return block + b"\n\n"

    @staticmethod
    def _message_start(block: bytes, data: bytes | None) -> bytes:
        try:
            event = json.loads(data or b"")
            message = event["message"]
        except (ValueError, KeyError, TypeError):
            return block + b"\n\n"
        event.setdefault("type", "message_start")
        for key, value in (("type", "message"), ("role", "assistant"), ("content", []), ("stop_reason", None),
                           ("stop_sequence", None)):
            message.setdefault(key, value)
        # the prompt's tokens arrive with message_delta (vLLM counts them at the end); clients
        # take the cumulative figures from there
        message.setdefault("usage", {"input_tokens": 0, "output_tokens": 0})
        return b"event: message_start\ndata: " + json.dumps(event).encode() + b"\n\n"

    @staticmethod
    def _error(block: bytes, data: bytes | None) -> bytes:
        try:
            event = json.loads(data or b"")
            error = event["error"]
            if error.get("type") in KNOWN_TYPES and event.get("type") == "error":
                return block + b"\n\n"
            message = str(error.get("message", ""))
        except (ValueError, KeyError, TypeError, AttributeError):
            return block + b"\n\n"
        return b"event: error\ndata: " + error_json(500, message) + b"\n\n"


# ---------------------------------------------------------------- requests

def check_request(data: dict, count_only: bool = False) -> None:
    """What the front server needs of a Messages request: a list of messages, each a role and
    content; the rest is the engine's to judge (its answer is mapped to Anthropic's shape)."""
    messages = data.get("messages")
    if not isinstance(messages, list):
        raise APIError(400, "messages: must be a list of {role, content} objects", "invalid_request",
                       param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant") \
                or not isinstance(message.get("content"), (str, list)):
            raise APIError(400, f"messages.{i}: must be an object with role 'user' or 'assistant' and content "
                                "(a string or a list of content blocks)", "invalid_request", param="messages")
    if not count_only and not isinstance(data.get("max_tokens"), int):
        raise APIError(400, "max_tokens: a whole number is required", "invalid_request", param="max_tokens")


def translate_request(data: dict, engine_version: str | None) -> bool:
    """Rewrite, in place, what the engine's version refuses or misreads in a request Anthropic
    clients commonly send (docs/agents.md lists each case); True when anything changed."""
    if not repairs_needed(engine_version):
        return False
    changed = False
    for message in data.get("messages") or []:
        if not isinstance(message, dict) or not isinstance(message.get("content"), list):
            continue
        blocks = []
        for block in message["content"]:
            new = _translated_block(block)
            changed |= new is not block
            if new is not None:
                blocks.append(new)
        message["content"] = blocks
    choice = data.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "none":
        # 0.12 knows auto, any and tool; "none" means: answer without tools
        data.pop("tool_choice")
        data.pop("tools", None)
        changed = True
    tools = data.get("tools")
    if isinstance(tools, list):
        # Anthropic's server tools (web_search, code_execution, ...) run on Anthropic's servers:
        # they have no input_schema, which 0.12 requires
        kept = [tool for tool in tools if not isinstance(tool, dict) or "input_schema" in tool]
        if len(kept) != len(tools):
            data["tools"] = kept
            changed = True
    return changed


def _translated_block(block):
    """One content block as 0.12 reads it: the same object when nothing changes, None to drop it."""
    if not isinstance(block, dict):
        return block
    kind = block.get("type")
    if kind in ("thinking", "redacted_thinking"):
        return None            # earlier turns' reasoning: 0.12 refuses the block type
    if kind == "tool_result":
        new = dict(block)
        if "tool_use_id" in block and not block.get("id"):
            new["id"] = block["tool_use_id"]          # 0.12 reads the tool call's id from `id`
        if isinstance(block.get("content"), list):
            new["content"] = _text_of(block["content"])   # 0.12 would send the list's Python repr
        return new
    if kind == "image" and isinstance(block.get("source"), dict):
        source = block["source"]
        if source.get("type") == "base64" and not str(source.get("data", "")).startswith("data:"):
            return {**block, "source": {**source, "data": f"data:{source.get('media_type')};base64,{source['data']}"}}
        if source.get("type") == "url" and "data" not in source:
            return {**block, "source": {**source, "data": source.get("url", "")}}
    if kind == "document" and isinstance(block.get("source"), dict) and block["source"].get("type") == "text":
        return {"type": "text", "text": str(block["source"].get("data", ""))}
    return block


def _text_of(content: list) -> str:
    return "\n".join(str(part.get("text", "")) for part in content
                     if isinstance(part, dict) and part.get("type") == "text")


# ---------------------------------------------------------------- count_tokens

def chat_request(data: dict) -> tuple[list[dict], list[dict] | None]:
    """The OpenAI chat messages and tools vLLM 0.12 makes of a (translated) Messages request
    (vllm/entrypoints/anthropic/serving_messages.py, _convert_anthropic_to_openai_request)."""
    messages: list[dict] = []
    system = data.get("system")
    if isinstance(system, str) and system:
        messages.append({"role": "system", "content": system})
    elif isinstance(system, list) and system:
        messages.append({"role": "system", "content": "".join(
            str(block.get("text") or "") for block in system if isinstance(block, dict) and block.get("type") == "text")})
    for message in data["messages"]:
        content = message["content"]
        if isinstance(content, str):
            messages.append({"role": message["role"], "content": content})
            continue
        parts: list[dict] = []
        calls: list[dict] = []
        for block in content:
            if not isinstance(block, dict):
                continue
            kind = block.get("type")
            if kind == "text" and block.get("text"):
                parts.append({"type": "text", "text": block["text"]})
            elif kind == "image" and isinstance(block.get("source"), dict):
                parts.append({"type": "image_url", "image_url": {"url": block["source"].get("data", "")}})
            elif kind == "tool_use":
                calls.append({"id": block.get("id") or "call", "type": "function",
                              "function": {"name": block.get("name") or "",
                                           "arguments": json.dumps(block.get("input") or {})}})
            elif kind == "tool_result":
                text = str(block["content"]) if block.get("content") else ""
                if message["role"] == "user":
                    messages.append({"role": "tool", "tool_call_id": block.get("id") or "", "content": text})
                else:
                    parts.append({"type": "text", "text": f"Tool result: {text}"})
        converted: dict[str, Any] = {"role": message["role"]}
        if calls:
            converted["tool_calls"] = calls
        if parts:
            converted["content"] = parts[0]["text"] if len(parts) == 1 and parts[0]["type"] == "text" else parts
        elif not calls:
            continue
        messages.append(converted)
    tools = None
    if isinstance(data.get("tools"), list):
        tools = [{"type": "function", "function": {"name": tool.get("name"), "description": tool.get("description"),
                                                    "parameters": _schema(tool.get("input_schema"))}}
                 for tool in data["tools"] if isinstance(tool, dict)]
    return messages, tools


def _schema(schema) -> dict:
    schema = dict(schema) if isinstance(schema, dict) else {}
    schema.setdefault("type", "object")        # as 0.12's AnthropicTool validator adds it: last
    return schema


# vLLM decides whether a template takes content as a string or as OpenAI's list of parts by
# looking for a loop over a message's content (chat_utils._detect_content_format)
_CONTENT_LOOP = re.compile(r"for\s+\w+\s+in\s+\w+(\[['\"]content['\"]\]|\.content)")
NO_TEMPLATE = ("As of transformers v4.44, default chat template is no longer allowed, so you must provide a chat "
               "template if the tokenizer does not define one.")      # vLLM's own words


def _conversation(messages: list[dict], template: str) -> list[dict]:
    """The messages as vLLM hands them to the template (chat_utils.parse_chat_messages)."""
    as_parts = bool(_CONTENT_LOOP.search(template))
    conversation = []
    for message in messages:
        content = message.get("content")
        parts = [] if content is None else [{"type": "text", "text": content}] if isinstance(content, str) else content
        if as_parts:
            value: Any = [part if part.get("type") != "image_url" else {"type": "image"} for part in parts]
        else:
            value = "\n".join(part["text"] for part in parts if part.get("type") == "text")
        converted = {"role": message["role"], "content": value}
        for call in message.get("tool_calls") or []:
            call["function"]["arguments"] = json.loads(call["function"]["arguments"] or "{}")
        if message.get("tool_calls"):
            converted["tool_calls"] = message["tool_calls"]
        if "tool_call_id" in message:
            converted["tool_call_id"] = message["tool_call_id"]
        conversation.append(converted)
    return conversation


class TokenizerUnavailable(Exception):
    """The lane's tokenizer files are not on this machine (a hub id never downloaded here), or
    the model has no tokenizer.json (a slow-only tokenizer)."""


# What transformers passes a chat template besides the messages (its special tokens by name).
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


@dataclass(frozen=True)
class LaneTokenizer:
    tokenizer: Any                      # tokenizers.Tokenizer
    templates: dict[str, str]           # name -> template ("default", "tool_use", ...)
    special: dict[str, Any]             # bos_token, ... as the template sees them


def _token_text(value) -> Any:
    if isinstance(value, dict):                      # a serialised AddedToken
        return value.get("content")
    if isinstance(value, list):
        return [_token_text(item) for item in value]
    return value


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@functools.lru_cache(maxsize=16)
def _load_tokenizer(directory: str) -> LaneTokenizer:
    """The files vLLM's tokenizer (transformers' fast tokenizer) is made of: tokenizer.json (the
    `tokenizers` library encodes exactly as the fast tokenizer does), the special tokens and the
    chat template (chat_template.jinja, else tokenizer_config.json's, else a processor's
    chat_template.json). Read with `tokenizers` and jinja2 alone: transformers imports torch."""
    from tokenizers import Tokenizer

    folder = Path(directory)
    if not (folder / "tokenizer.json").is_file():
        raise TokenizerUnavailable(f"{folder} has no tokenizer.json (a slow-only tokenizer): count_tokens reads "
                                   "fast tokenizers only")
    config = _read_json(folder / "tokenizer_config.json")
    special = {key: _token_text(value) for key, value in _read_json(folder / "special_tokens_map.json").items()}
    special.update({key: _token_text(config[key]) for key in (*SPECIAL_TOKENS, "additional_special_tokens")
                    if config.get(key) is not None})
    templates: dict[str, str] = {}
    found = config.get("chat_template")
    if isinstance(found, list):
        templates.update({item["name"]: item["template"] for item in found if isinstance(item, dict)})
    elif isinstance(found, str):
        templates["default"] = found
    if (folder / "chat_template.jinja").is_file():
        templates["default"] = (folder / "chat_template.jinja").read_text()
    if not templates and isinstance(processor := _read_json(folder / "chat_template.json").get("chat_template"), str):
        templates["default"] = processor
    return LaneTokenizer(Tokenizer.from_file(str(folder / "tokenizer.json")), templates, special)


def lane_tokenizer(lane: LaneConfig, environ) -> LaneTokenizer:
    """The lane's tokenizer (TOKENIZER, else its model): its directory, or for a hub id its
    snapshot in the Hugging Face cache; never downloaded here (the engine's start does that)."""
    from .preflight import model_config_file

    source = lane.settings.get("TOKENIZER") or lane.model
    local = source.startswith(("/", "./", "../", "~")) or Path(source).is_dir()
    found = model_config_file(source, local, environ)
    if found is None or not found.parent.is_dir():
        raise TokenizerUnavailable(f"the tokenizer of {source!r} is not on this machine yet (not in the Hugging "
                                   "Face cache): it arrives with the lane's first start")
    try:
        with _load_lock:                 # one read per lane even when requests arrive together
            return _load_tokenizer(str(found.parent))
    except ImportError as error:
        raise TokenizerUnavailable(f"count_tokens needs the tokenizers and jinja2 packages beside the launcher "
                                   f"(vLLM's own dependencies): {error}") from None


_load_lock = threading.Lock()


def lane_template(lane: LaneConfig, tokenizer: LaneTokenizer, tools) -> str | None:
    """The chat template the lane's engine uses: CHAT_TEMPLATE (a file or the template itself),
    else the tokenizer's (its tool_use one, when it names templates and tools are given)."""
    configured = lane.settings.get("CHAT_TEMPLATE")
    if configured:
        path = Path(configured)
        return path.read_text() if not any(mark in configured for mark in ("{{", "{%")) and path.is_file() \
            else configured
    templates = tokenizer.templates
    return templates.get("tool_use") if tools and "tool_use" in templates else templates.get("default")


@functools.lru_cache(maxsize=1)
def _environment():
    """Jinja as transformers sets it up for chat templates (chat_template_utils); jinja2 and
    `tokenizers` are imported only here (vLLM's own dependencies, not the launcher's)."""
    from jinja2 import TemplateError, nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """transformers' {% generation %} block (it marks assistant tokens): rendered as its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise TemplateError(message)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[Generation, loopcontrols])
    environment.filters["tojson"] = lambda value, ensure_ascii=False, indent=None, separators=None, sort_keys=False: \
        json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return environment


@functools.lru_cache(maxsize=16)
def _compiled(template: str):
    return _environment().from_string(template)


def count_tokens(lane: LaneConfig, data: dict, environ=None) -> int:
    """The prompt tokens the lane's engine (vLLM 0.12) counts for a Messages request (translated):
    its chat conversion, the chat template with the tools and the generation prompt, tokens
    without added special tokens. Raises APIError (the engine's answer) or TokenizerUnavailable."""
    tokenizer = lane_tokenizer(lane, os.environ if environ is None else environ)
    messages, tools = chat_request(data)
    template = lane_template(lane, tokenizer, tools)
    if not template:
        raise APIError(400, NO_TEMPLATE, "no_chat_template")
    try:
        _environment()
    except ImportError as error:
        raise TokenizerUnavailable(f"count_tokens needs jinja2 beside the launcher: {error}") from None
    try:
        prompt = _compiled(template).render(messages=_conversation(messages, template), tools=tools, documents=None,
                                            add_generation_prompt=True, **tokenizer.special)
    except Exception as error:       # the template's own raise_exception(), a jinja error: the engine's 400
        raise APIError(400, str(error), "invalid_request") from None
    return len(tokenizer.tokenizer.encode(prompt, add_special_tokens=False).ids)
