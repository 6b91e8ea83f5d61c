"""How a failed request becomes a response, in one place: :class:`HTTPFailure` carries the status, a
metrics reason and the client's message; :func:`failure_body` is its JSON answer.

An error the server did not foresee is logged with the request id and answered as a generic 500 naming
that id (:func:`internal_error`), never with the exception's text.
"""

from __future__ import annotations

import json
import logging
import traceback

log = logging.getLogger("vitdeploy.serve")


class HTTPFailure(Exception):
    """A request that cannot be answered: status code, a metrics reason and the message the client sees."""

    def __init__(self, code: int, reason: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.headers = code, reason, message, headers or {}


def bad_input(message: str) -> HTTPFailure:
    """A 400 for input the model cannot take."""
    return HTTPFailure(400, "bad_input", message)


def internal_error(endpoint: str, rid: str, e: BaseException) -> HTTPFailure:
    """An unforeseen failure: the details to the log under the request id, a generic 500 to the client."""
    log.error("request %s on %s failed", rid, endpoint, exc_info=e)
    return HTTPFailure(500, "internal", f"internal error (request id {rid}); the server log has the details")


def forget_frames(e: BaseException) -> None:
    """Drop the locals of the frames a failure passed through (a body, an inflated buffer, parsed JSON): a
    traceback in a reference cycle would keep them until the next garbage collection, past the trim."""
    traceback.clear_frames(e.__traceback__)
    e.__traceback__ = None


def failure_body(e: HTTPFailure, rid: str | None) -> bytes:
    """The JSON body of a failure: ``{"error"}``, and the request id when given (v1 answers carry it)."""
    return json.dumps({"error": e.message} if rid is None else {"error": e.message, "request_id": rid}).encode()
