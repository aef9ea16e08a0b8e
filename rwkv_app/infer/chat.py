"""The rwkv-rs chat template: `Role: content` turns joined by the separator, ending with `Assistant:`.

With the defaults a conversation becomes

    System: You are terse.

    User: hi

    Assistant:

and the model writes the assistant's turn. A turn's content never contains the separator (blank lines inside a
message are folded into one newline, as ChatRWKV does), so the model only ever sees a blank line between turns, and
the server stops generation when the model starts a new user turn (`default_stop`).
"""

from __future__ import annotations

import re
from typing import Sequence

from rwkv_app.config import ChatTemplate


def role_name(role: str, template: ChatTemplate) -> str:
    return {"system": template.system, "developer": template.system, "user": template.user,
            "assistant": template.assistant, "tool": template.tool, "function": template.tool}[role]


def _clean(text: str, separator: str) -> str:
    text = text.replace("\r\n", "\n").strip()
    if separator.strip() == "" and "\n" in separator:
        return re.sub(r"\n\s*\n", "\n", text)  # a blank line is what separates turns
    return text.replace(separator, "\n") if separator else text


def render_chat(messages: Sequence[tuple[str, str]], template: ChatTemplate) -> str:
    """[(role, text)] -> the prompt, ending with `Assistant:` so the model continues as the assistant."""
    turns = [f"{role_name(role, template)}: {_clean(text, template.separator)}" for role, text in messages]
    return template.separator.join(turns + [f"{template.assistant}:"])


def default_stop(template: ChatTemplate) -> str:
    """The model starting the next user turn ends the assistant's turn."""
    return f"{template.separator}{template.user}:"
