"""The OpenAI error schema: every refusal the API makes is an ``ApiError``, rendered as OpenAI's error body, so
unmodified OpenAI clients parse our refusals (a too-large request, an unknown model, a full queue) as they parse
OpenAI's.
"""

from __future__ import annotations

from enum import Enum
from typing import Any


class ErrorType(str, Enum):
    """OpenAI's error ``type`` values: clients branch on these, not on the message."""

    INVALID_REQUEST = "invalid_request_error"
    AUTHENTICATION = "authentication_error"
    NOT_FOUND = "not_found_error"
    SERVER = "server_error"
    UNAVAILABLE = "service_unavailable"


class ApiError(Exception):
    """A request the API refuses: rendered as ``{"error": {message, type, param, code}}`` with ``status``.

    Pickled whole, so a DeploymentHandle call to a replica (``roll_out``'s) re-raises it as this class.
    """

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        error_type: ErrorType = ErrorType.INVALID_REQUEST,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.error_type = status, message, param, code, error_type

    def __reduce__(self) -> tuple[Any, ...]:
        return (ApiError, (self.status, self.message, self.param, self.code, self.error_type))

    def body(self) -> dict[str, Any]:
        error = {"message": self.message, "type": self.error_type.value, "param": self.param, "code": self.code}
        return {"error": error}
