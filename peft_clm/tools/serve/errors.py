"""The one error type of the server: what was wrong, the HTTP status, and the OpenAI-style JSON body it becomes."""

from __future__ import annotations

from typing import Optional


class ApiError(Exception):
    """A request the server answers with an error; `body()` is the JSON the OpenAI clients parse.

    Example:
        ```py
        >>> ApiError(400, "alpha must be finite, got nan.", param="alpha").body()["error"]["param"]
        'alpha'
        ```
    """

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None,
                 type: Optional[str] = None, headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# The `type` strings OpenAI's API uses for these statuses.
_TYPES = {404: "invalid_request_error", 413: "invalid_request_error", 503: "server_overloaded"}
