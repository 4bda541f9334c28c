"""OpenAI request bodies, checked: what `beectl api` accepts, and the errors it answers with.

Only the fields beed acts on are read; unknown fields are ignored (clients send many), and a
field that would change the answer in a way beed cannot honour is refused with a 400.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from beectl.speculative.adaptive import SpeculationConfig
from protocol.errors import BadRequestError

MAX_N = 8
MAX_STOPS = 4
DEFAULT_MAX_TOKENS = 256
ROLES = ("system", "developer", "user", "assistant")


class ApiError(Exception):
    """An answer with an OpenAI error body: {"error": {message, type, param, code}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type,
            param,
            code,
        )

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


@dataclass(frozen=True)
class Sampling:
    """The generation arguments of one request."""

    max_tokens: int
    temperature: float  # 0: greedy
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    n: int
    stream: bool
    include_usage: bool
    speculate: str | None = (
        None  # beed's extension: "auto" | "off" | a draft length; None: server's
    )


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: list[dict[str, str]]
    sampling: Sampling


@dataclass(frozen=True)
class CompletionRequest:
    model: str
    prompt: str
    sampling: Sampling


def parse_chat(body: Any) -> ChatRequest:
    body = _object(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list of messages", "messages")
    return ChatRequest(
        _model(body), [_message(m, i) for i, m in enumerate(messages)], _sampling(body)
    )


def parse_completion(body: Any) -> CompletionRequest:
    body = _object(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise bad("'prompt' must be a non-empty string", "prompt")
    return CompletionRequest(_model(body), prompt, _sampling(body))


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    return body


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("'model' must name a model (GET /v1/models lists them)", "model")
    return model


def _message(message: Any, index: int) -> dict[str, str]:
    param = f"messages[{index}]"
    if not isinstance(message, dict):
        raise bad(f"{param} must be an object with 'role' and 'content'", param)
    role = message.get("role")
    if role not in ROLES:
        raise bad(f"{param}.role must be one of {', '.join(ROLES)}, got {role!r}", f"{param}.role")
    content = message.get("content")
    if isinstance(content, list):  # content parts: only text ones
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise bad(f"{param}.content: only text parts are supported", f"{param}.content")
            texts.append(str(part.get("text", "")))
        content = "".join(texts)
    if not isinstance(content, str):
        raise bad(f"{param}.content must be a string", f"{param}.content")
    return {"role": "system" if role == "developer" else role, "content": content}


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise bad(f"'{name}' must be a number between {low:g} and {high:g}, got {value!r}", name)
    return float(value)


def _integer(body: dict[str, Any], name: str, default: int | None, low: int) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise bad(f"'{name}' must be an integer >= {low}, got {value!r}", name)
    return value


def _sampling(body: dict[str, Any]) -> Sampling:
    for name in ("logprobs", "top_logprobs", "tools", "functions", "logit_bias"):
        if body.get(name) not in (None, False, [], {}):
            raise bad(f"'{name}' is not supported by beed", name)
    if body.get("response_format") not in (None, {"type": "text"}):
        raise bad("only the 'text' response_format is supported", "response_format")
    max_tokens = _integer(body, "max_completion_tokens", None, 1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", None, 1) or DEFAULT_MAX_TOKENS
    stop = body.get("stop")
    stops: tuple[str, ...]
    if stop is None:
        stops = ()
    elif isinstance(stop, str):
        stops = (stop,) if stop else ()
    elif isinstance(stop, list) and all(isinstance(s, str) and s for s in stop):
        stops = tuple(stop)
    else:
        raise bad("'stop' must be a string or a list of non-empty strings", "stop")
    if len(stops) > MAX_STOPS:
        raise bad(f"'stop' takes at most {MAX_STOPS} sequences", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("'stream' must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad("'stream_options' must be an object", "stream_options")
    n = _integer(body, "n", None, 1) or 1
    if n > MAX_N:
        raise bad(f"'n' may be at most {MAX_N}", "n")
    return Sampling(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        seed=_integer(body, "seed", None, 0),
        stop=stops,
        n=n,
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
        speculate=_speculate(body),
    )


def _speculate(body: dict[str, Any]) -> str | None:
    value = body.get("speculate")
    if value is None:
        return None
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        try:
            SpeculationConfig.parse(value)
            return str(value)
        except BadRequestError:
            pass
    raise bad(
        '\'speculate\' must be "auto", "off", a draft length from 0 to 64 or "NxW" '
        "(a tree of depth N and W branches)",
        "speculate",
    )
