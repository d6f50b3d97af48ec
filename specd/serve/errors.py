"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}`` with the right status."""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """A request that cannot be served; ``body()`` is what OpenAI's clients parse."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type_ = type_
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type_, "param": self.param,
                          "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def unknown_model(name: str, served: str) -> APIError:
    return APIError(404, f"The model `{name}` does not exist; this server serves `{served}` "
                    "(see GET /v1/models).", param="model", code="model_not_found")


def bad_key() -> APIError:
    return APIError(401, "Incorrect or missing API key: send `Authorization: Bearer <key>` with a "
                    "key from serve.api_keys.", type_="invalid_request_error", code="invalid_api_key")


def busy(limit: int, queue_size: int = 0) -> APIError:
    """The queue is full (or there is none): 429, which OpenAI's clients back off and retry."""
    queued = f" and {queue_size} more waiting (serve.queue_size)" if queue_size else ""
    return APIError(429, f"Too many concurrent requests: this server runs at most {limit} at once "
                    f"(serve.max_concurrent){queued}; retry shortly.", type_="rate_limit_error",
                    code="rate_limit_exceeded", headers={"Retry-After": "1"})


def queue_timeout(limit: int, timeout_s: float) -> APIError:
    return APIError(429, f"The request waited {timeout_s:g} s in the queue (serve.queue_timeout_s) for one "
                    f"of this server's {limit} slots (serve.max_concurrent); retry later.",
                    type_="rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": "5"})


def pool_unavailable(reason: str) -> APIError:
    return APIError(503, f"The verifier pool is unavailable: {reason}.", type_="service_unavailable",
                    code="pool_unavailable", headers={"Retry-After": "5"})


def session_failed(code: str, message: str) -> APIError:
    """A session the pool ended with a typed error (wire ErrorCode values)."""
    statuses = {"capacity": 503, "tenant_limit": 429, "limit_exceeded": 400, "invalid_token": 400}
    status = statuses.get(code, 502)
    type_ = {429: "rate_limit_error", 400: "invalid_request_error"}.get(status, "server_error")
    return APIError(status, f"The verifier pool ended the session: {code}: {message}", type_=type_,
                    code=code)
