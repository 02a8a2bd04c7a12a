"""The one exception the HTTP layer answers with a status code and OpenAI's error body.

Raised by the serving logic, the admin routes, uploads and the request gate; turned into a response by the
app's error handlers (`server.http.app`) or, before the app runs, by the gate itself (`server.http.guard`).
"""

from __future__ import annotations


class APIError(Exception):
    """An error the API answers with `status` and OpenAI's error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
