"""HTTP errors in OpenAI's JSON shape: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from collections.abc import Mapping

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse


class APIError(HTTPException):
    """An error answered in OpenAI's shape with HTTP status ``status`` (type ``server_error`` for 5xx,
    else ``invalid_request_error``).

    It is an ``HTTPException`` so that FastAPI passes it on unchanged when it is raised while a request
    body is being read (the request guard raises it for bodies too large or too slow).
    """

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ):
        super().__init__(status, message, headers)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = "server_error" if status >= 500 else "invalid_request_error"

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)
