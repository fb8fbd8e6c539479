"""The image-generation request of the OpenAI images API, validated field by field.

Every problem becomes an :class:`ApiError` carrying the status and OpenAI's error fields
(``message``, ``type``, ``param``, ``code``), so the server answers in OpenAI's error shape.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

MAX_N = 4
MAX_PROMPT_CHARS = 4000
MAX_SEED = 2**32 - 1
IGNORED = {"user"}  # OpenAI fields accepted and not used


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type, self.headers = type_, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class GenerationRequest:
    prompt: str
    model: str
    n: int
    seed: int
    steps: int


def _invalid(param: str, message: str) -> ApiError:
    return ApiError(422, message, param=param, code="invalid_value")


def _integer(body: dict, name: str, default: int, low: int, high: int) -> int:
    value = body.get(name, default)
    if type(value) is not int:  # bool is an int subclass; 1.0 is not an integer
        raise _invalid(name, f"'{name}' must be an integer, got {json.dumps(value)}")
    if not low <= value <= high:
        raise _invalid(name, f"'{name}' must be between {low} and {high}, got {value}")
    return value


def _string(body: dict, name: str, default: str | None) -> str:
    value = body.get(name, default)
    if value is None:
        raise ApiError(422, f"'{name}' is required", param=name, code="missing_required_parameter")
    if not isinstance(value, str):
        raise _invalid(name, f"'{name}' must be a string, got {json.dumps(value)}")
    return value


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return body


def parse_generation(body: dict, *, size: str, steps: tuple[int, ...]) -> GenerationRequest:
    """``body`` checked against this server: the model's native ``size`` and the step counts it has."""
    known = {"prompt", "model", "n", "size", "response_format", "output_format", "seed", "steps"} | IGNORED
    for name in body:
        if name not in known:
            raise ApiError(422, f"unknown parameter '{name}'; this server takes {', '.join(sorted(known))}",
                           param=name, code="unknown_parameter")
    prompt = _string(body, "prompt", None)
    if not prompt.strip():
        raise _invalid("prompt", "'prompt' is empty")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise _invalid("prompt", f"'prompt' is {len(prompt)} characters long; the limit is {MAX_PROMPT_CHARS}")
    model = _string(body, "model", "base")
    n = _integer(body, "n", 1, 1, MAX_N)
    asked = _string(body, "size", size)
    if asked not in (size, "auto"):
        raise _invalid("size", f"'size' must be {size} (the model's native size) or auto, got {asked!r}")
    response_format = _string(body, "response_format", "b64_json")
    if response_format == "url":
        raise _invalid("response_format", "response_format 'url' is not supported: this server keeps no files "
                       "to link to and returns every image inline; use 'b64_json'")
    if response_format != "b64_json":
        raise _invalid("response_format", f"'response_format' must be 'b64_json', got {response_format!r}")
    if _string(body, "output_format", "png") != "png":
        raise _invalid("output_format", "'output_format' must be 'png'")
    seed = _integer(body, "seed", secrets.randbelow(MAX_SEED + 1), 0, MAX_SEED)
    step_count = body.get("steps", 1)
    if type(step_count) is not int or step_count not in steps:
        raise _invalid("steps", f"'steps' must be one of {', '.join(map(str, steps))} (the step counts this "
                       f"server has), got {json.dumps(step_count)}")
    return GenerationRequest(prompt, model, n, seed, step_count)
