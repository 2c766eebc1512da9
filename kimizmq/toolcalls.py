"""What a Kimi model writes, split into OpenAI's parts: reasoning
(`<think>…</think>`), content, and tool calls.

Kimi-K2 writes tool calls as one section of special tokens:

    <|tool_calls_section_begin|>
    <|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|>
    ...
    <|tool_calls_section_end|>

The id `functions.NAME:INDEX` names the function; the arguments are JSON. A
section is held back until it is complete and then comes out as tool calls,
or, if it does not parse, as the text it was (with a warning in the log):
never half of each.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from . import log

SECTION_BEGIN = "<|tool_calls_section_begin|>"
SECTION_END = "<|tool_calls_section_end|>"
CALL_BEGIN = "<|tool_call_begin|>"
ARGUMENT_BEGIN = "<|tool_call_argument_begin|>"
CALL_END = "<|tool_call_end|>"
THINK_BEGIN = "<think>"
THINK_END = "</think>"
TOOL_MARKERS = (SECTION_BEGIN, SECTION_END, CALL_BEGIN, ARGUMENT_BEGIN, CALL_END)

_CALL = re.compile(
    re.escape(CALL_BEGIN)
    + r"\s*(?P<id>[^<]*?)\s*"
    + re.escape(ARGUMENT_BEGIN)
    + r"(?P<args>.*?)"
    + re.escape(CALL_END),
    re.DOTALL,
)
_CALL_ID = re.compile(r"(?:functions\.)?(?P<name>[A-Za-z0-9_.\-]+?)(?::(?P<index>\d+))?")

logger = log.get_logger()


class MalformedToolCalls(ValueError):
    """A tool-call section that does not parse."""


def call_id(name: str, index: int) -> str:
    """The id Kimi's templates give the call: the model reads it back on the next turn."""
    return f"functions.{name}:{index}"


def parse_section(body: str) -> list[dict]:
    """The OpenAI tool calls in a section's body (between its markers)."""
    calls, end = [], 0
    for m in _CALL.finditer(body):
        if body[end : m.start()].strip():
            raise MalformedToolCalls(f"text between tool calls: {body[end : m.start()]!r}")
        end = m.end()
        ident = _CALL_ID.fullmatch(m.group("id"))
        if ident is None:
            raise MalformedToolCalls(f"tool call id {m.group('id')!r} is not functions.NAME:INDEX")
        try:
            json.loads(m.group("args"))
        except ValueError as e:
            raise MalformedToolCalls(f"arguments of {m.group('id')!r} are not JSON: {e}") from None
        calls.append(
            {
                "id": m.group("id"),
                "type": "function",
                "function": {"name": ident.group("name"), "arguments": m.group("args").strip()},
            }
        )
    if body[end:].strip():
        raise MalformedToolCalls(f"text after the last tool call: {body[end:]!r}")
    if not calls:
        raise MalformedToolCalls("an empty tool-call section")
    return calls


def _partial_suffix(text: str, marker: str) -> int:
    """How many trailing characters of `text` could begin `marker`."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


@dataclass
class OutputParser:
    """Splits the model's text as it streams in. `feed` and `finish` return
    deltas in OpenAI's shape: {"reasoning_content": s}, {"content": s} or
    {"tool_calls": [...]} (each call with its "index")."""

    thinking: bool = False  # the template thinks: a leading <think>…</think> is reasoning
    tools: bool = False  # tools were offered: a section is parsed into calls
    _buf: str = ""
    _state: str = "start"  # start | think | content | section
    _calls: int = 0
    tool_calls: list[dict] = field(default_factory=list)

    def feed(self, text: str) -> list[dict]:
        self._buf += text
        out: list[dict] = []
        while self._buf:
            before = (self._state, len(self._buf))
            out += self._step()
            if (self._state, len(self._buf)) == before:
                break  # waiting for more text
        return _merge(out)

    def finish(self) -> list[dict]:
        out: list[dict] = []
        if self._state == "section":
            logger.warning("tool_calls_unterminated", text=self._buf[:200])
            out.append({"content": SECTION_BEGIN + self._buf})
        elif self._buf:
            out.append({"reasoning_content" if self._state == "think" else "content": self._buf})
        self._buf = ""
        return _merge(out)

    def _step(self) -> list[dict]:
        buf = self._buf
        if self._state == "start":
            stripped = buf.lstrip()
            if not self.thinking or (stripped and not THINK_BEGIN.startswith(stripped[: len(THINK_BEGIN)])):
                self._state = "content"
            elif stripped.startswith(THINK_BEGIN):
                self._buf, self._state = stripped[len(THINK_BEGIN) :], "think"
            return []
        if self._state == "think":
            i = buf.find(THINK_END)
            if i >= 0:
                self._buf, self._state = buf[i + len(THINK_END) :].lstrip("\n"), "content"
                return [{"reasoning_content": buf[:i]}] if i else []
            keep = _partial_suffix(buf, THINK_END)
            self._buf = buf[len(buf) - keep :]
            return [{"reasoning_content": buf[: len(buf) - keep]}] if len(buf) > keep else []
        if self._state == "content":
            i = buf.find(SECTION_BEGIN) if self.tools else -1
            if i >= 0:
                self._buf, self._state = buf[i + len(SECTION_BEGIN) :], "section"
                return [{"content": buf[:i]}] if i else []
            keep = _partial_suffix(buf, SECTION_BEGIN) if self.tools else 0
            self._buf = buf[len(buf) - keep :]
            return [{"content": buf[: len(buf) - keep]}] if len(buf) > keep else []
        i = buf.find(SECTION_END)
        if i < 0:
            return []
        self._buf, self._state = buf[i + len(SECTION_END) :], "content"
        try:
            calls = parse_section(buf[:i])
        except MalformedToolCalls as e:
            logger.warning("tool_calls_malformed", error=str(e))
            return [{"content": SECTION_BEGIN + buf[: i + len(SECTION_END)]}]
        for c in calls:
            c["index"] = self._calls
            self._calls += 1
        self.tool_calls += calls
        return [{"tool_calls": calls}]


def _merge(deltas: list[dict]) -> list[dict]:
    """Adjacent deltas of the same text kind joined; empty ones dropped."""
    out: list[dict] = []
    for d in deltas:
        ((key, value),) = d.items()
        if not value:
            continue
        if out and key in out[-1] and key != "tool_calls":
            out[-1][key] += value
        else:
            out.append({key: value})
    return out


def template_thinks(source: str | None) -> bool:
    """Whether a chat template writes <think> blocks (Kimi-K2-Thinking and later)."""
    return bool(source) and THINK_BEGIN in source


def may_think(shipped_templates: list[str]) -> bool:
    """Whether a model may open its answer with a <think> block: one of the
    chat templates its checkpoint ships writes them, even if another is served
    (a model that thinks when its system prompt asks it to)."""
    return any(template_thinks(t) for t in shipped_templates)
