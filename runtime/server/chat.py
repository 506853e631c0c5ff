"""A chat request as the backend takes it, and the model's reply as OpenAI's message: tools in, tool calls out.

Tools are offered to the model in its system message, with the convention Hermes-style models are trained on: a
call is ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` in the reply, and a tool's result comes back
in ``<tool_response>``. When the client requires a call (``tool_choice`` "required" or a named function), the
reply is decoded under the JSON schema of a call instead, so a call it is, with arguments that fit.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from typing import Any

from runtime.models.backend import Message
from runtime.server.errors import APIError
from runtime.server.responses import FunctionCallOut, ToolCallOut
from runtime.server.schema import ChatMessageIn, NamedToolChoice, Tool

# OpenAI's roles as the backends take them: "developer" is the newer name for "system", and a tool's result is
# handed back on the user's side of the chat (every chat template has that role).
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "user"}

TOOLS_PROMPT = (
    "You can call functions to help answer. The functions, as JSON schemas:\n<tools>\n{tools}\n</tools>\n"
    'To call one, reply with <tool_call>{{"name": "<function name>", "arguments": {{<arguments as JSON>}}}}'
    "</tool_call> and nothing else; its result will come back in <tool_response>."
)
_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def render(messages: Sequence[ChatMessageIn], tools: Sequence[Tool] = ()) -> list[Message]:
    """The backend's messages for a chat (and the tools offered, if any); 400 for what no model can answer."""
    if not messages:
        raise APIError(400, "messages is empty: send at least one user message")
    # Names tell apart participants who share a role (a group chat); one name per role adds nothing.
    names: dict[str, set[str]] = {}
    for m in messages:
        if m.name:
            names.setdefault(m.role, set()).add(m.name)
    rendered: list[Message] = []
    for i, m in enumerate(messages):
        text = _text(m.content, f"messages[{i}].content")
        if m.role == "assistant":
            text = text or m.refusal or ""
            text += "".join(
                f"\n<tool_call>{_call_json(call.function.name, call.function.arguments)}</tool_call>"
                for call in m.tool_calls or []
            )
            text = text.strip()
        elif m.role == "tool":
            if not m.tool_call_id:
                raise APIError(400, f"messages[{i}].tool_call_id is missing: a tool message answers a tool call")
            text = f"<tool_response>\n{text}\n</tool_response>"
        if m.name and len(names[m.role]) > 1:
            text = f"{m.name}: {text}"
        rendered.append(Message(role=ROLES[m.role], content=text))
    if not any(m.role in ("user", "tool") and _text(m.content, "").strip() for m in messages):
        raise APIError(400, "no user message has any text: there is nothing to answer")
    if tools:
        offer = TOOLS_PROMPT.format(
            tools="\n".join(json.dumps(t.function.model_dump(exclude_none=True)) for t in tools)
        )
        if rendered[0]["role"] == "system":
            rendered[0] = Message(role="system", content=f"{rendered[0]['content']}\n\n{offer}")
        else:
            rendered.insert(0, Message(role="system", content=offer))
    return rendered


def forced_call_schema(tools: Sequence[Tool], choice: str | NamedToolChoice | None) -> dict[str, Any] | None:
    """The JSON schema a reply must follow when the client requires a tool call; None when the model may choose.

    >>> from runtime.server.schema import FunctionDef
    >>> tool = Tool(type="function", function=FunctionDef(name="f", parameters={"type": "object"}))
    >>> forced_call_schema([tool], "required")["anyOf"][0]["properties"]["name"]
    {'const': 'f'}
    """
    if isinstance(choice, NamedToolChoice):
        chosen = [t for t in tools if t.function.name == choice.function.name]
        if not chosen:
            raise APIError(400, f"tool_choice names {choice.function.name!r}, which is not one of the tools")
    elif choice == "required":
        chosen = list(tools)
    else:
        return None
    return {
        "anyOf": [
            {
                "type": "object",
                "properties": {
                    "name": {"const": t.function.name},
                    # Closed: a function takes the arguments it declares, and a model left free to add keys may
                    # never stop adding them.
                    "arguments": closed_schema(t.function.parameters or {"type": "object"}),
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for t in chosen
        ]
    }


def closed_schema(schema: Any) -> Any:
    """A strict schema as OpenAI reads one: an object has the properties it lists and no others.

    >>> closed_schema({"type": "object", "properties": {"a": {"type": "object"}}})["properties"]["a"]
    {'type': 'object', 'additionalProperties': False}
    """
    if isinstance(schema, list):
        return [closed_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: closed_schema(value) for key, value in schema.items()}
    if closed.get("type") == "object":
        closed.setdefault("additionalProperties", False)
    return closed


def tool_calls(text: str, tools: Sequence[Tool], *, forced: bool, parallel: bool = True) -> list[ToolCallOut]:
    """The calls of offered tools in a reply, in OpenAI's shape; none when it calls nothing (or nothing offered).

    >>> from runtime.server.schema import FunctionDef
    >>> tools = [Tool(type="function", function=FunctionDef(name="add"))]
    >>> calls = tool_calls('<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>', tools, forced=False)
    >>> calls[0].function
    FunctionCallOut(name='add', arguments='{"a": 1}')
    """
    offered = {t.function.name for t in tools}
    bodies = [text] if forced else _CALL.findall(text)
    if not forced and not bodies and text.lstrip().startswith("{"):
        bodies = [text]  # a bare call, as small models often write it
    calls = []
    for body in bodies:
        try:
            call = json.loads(body)
        except json.JSONDecodeError:
            continue
        if not isinstance(call, dict) or call.get("name") not in offered:
            continue
        arguments = call.get("arguments", call.get("parameters", {}))
        function = FunctionCallOut(name=call["name"], arguments=json.dumps(arguments))
        calls.append(ToolCallOut(id=f"call_{uuid.uuid4().hex[:24]}", function=function))
    return calls if parallel else calls[:1]


def _call_json(name: str, arguments: str) -> str:
    try:
        parsed: Any = json.loads(arguments)
    except json.JSONDecodeError:
        parsed = arguments
    return json.dumps({"name": name, "arguments": parsed})


def _text(content: str | list[dict[str, Any]] | None, where: str) -> str:
    """A message's text; OpenAI clients may send it as a list of typed parts."""
    if content is None or isinstance(content, str):
        return content or ""
    for j, part in enumerate(content):
        if part.get("type") != "text":
            raise APIError(400, f"{where}[{j}].type {part.get('type')!r}: redpen's server takes text parts only")
    return "".join(str(part.get("text", "")) for part in content)
