"""Error codes of the coven.daemon.v1 API and the typed exceptions that carry them."""

from __future__ import annotations

from typing import Any


class CovenError(Exception):
    """
    A failure that the API reports as an error envelope.

    @ivar code: the machine-readable error code clients branch on.
    @ivar status: the HTTP status of the response.
    @ivar message: a sentence for people.
    @ivar details: context such as the session id or the offending field.
    """

    code = "internal_error"
    status = 500
    defaultMessage = "Unexpected internal daemon error."

    def __init__(self, message: str | None = None, **details: Any) -> None:
        self.message = message or self.defaultMessage
        self.details = details
        super().__init__(self.message)

    def envelope(self) -> dict[str, Any]:
        """
        Build the JSON error envelope for this failure.
        """
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            error["details"] = self.details
        return {"error": error}


class RouteNotFound(CovenError):
    code = "not_found"
    status = 404
    defaultMessage = "Route not found."


class InvalidRequest(CovenError):
    code = "invalid_request"
    status = 400
    defaultMessage = "Malformed request."


class UnsupportedAPIVersion(InvalidRequest):
    status = 404
    defaultMessage = "Unsupported API version."


class SessionNotFound(CovenError):
    code = "session_not_found"
    status = 404
    defaultMessage = "Session was not found."

    def __init__(self, message: str | None = None, **details: Any) -> None:
        sessionId = details.get("sessionId")
        if message is None and isinstance(sessionId, str):
            message = f"No session has the id {sessionId!r}."
        super().__init__(message, **details)


class SessionNotLive(CovenError):
    code = "session_not_live"
    status = 409
    defaultMessage = "Session is not live."


class ProjectRootViolation(CovenError):
    code = "project_root_violation"
    status = 400
    defaultMessage = "Requested cwd resolves outside the project root."


class PtySpawnFailed(CovenError):
    code = "pty_spawn_failed"
    status = 500
    defaultMessage = "Harness PTY could not be launched."


class RuntimeUnavailable(CovenError):
    code = "runtime_unavailable"
    status = 503
    defaultMessage = "The session runtime is unavailable."


class InternalError(CovenError):
    pass
