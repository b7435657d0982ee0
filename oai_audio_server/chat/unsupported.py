"""Request fields that ask for something this model cannot give: a 400 that says so.

Chat UIs send some fields with every request (``tools`` with ``tool_choice`` "auto"), so
those are accepted and answered with plain text. A request that relies on the feature (a
forced tool call, spoken output) would get a 200 it cannot use and fail later in the
client, so it is refused up front instead, naming the field. (``n``, log probabilities,
penalties and ``response_format`` are honoured: see chat/options.py.)
"""

from __future__ import annotations

from typing import Any

from oai_audio_server.errors import InvalidRequestError
from oai_audio_server.protocol import ChatCompletionRequest

TEXT_ONLY_TOOL_CHOICES = (None, "auto", "none")


def reject_unsupported(request: ChatCompletionRequest) -> None:
    """Checked before any audio is decoded: these cost nothing to refuse."""
    for field, choice in (("tool_choice", request.tool_choice),
                          ("function_call", request.function_call)):
        if not _text_only(choice):
            forced = repr(choice) if isinstance(choice, str) else "a named function"
            raise InvalidRequestError(
                f"{field} asks for a tool call ({forced}), and this model does not call "
                "tools; use \"auto\" or \"none\" (the answer is then text)",
                param=field,
                code="unsupported_parameter",
            )
    if request.modalities and any(m != "text" for m in request.modalities):
        raise InvalidRequestError(
            "this model answers with text only; set modalities to [\"text\"] or leave it out",
            param="modalities",
            code="unsupported_parameter",
        )


def _text_only(tool_choice: Any) -> bool:
    """Choices that let the model answer without calling a tool, as it always does here:
    none given, "auto", "none", or the allowed-tools form in "auto" mode."""
    if tool_choice in TEXT_ONLY_TOOL_CHOICES:
        return True
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "allowed_tools":
        allowed = tool_choice.get("allowed_tools")
        return isinstance(allowed, dict) and allowed.get("mode", "auto") == "auto"
    return False
