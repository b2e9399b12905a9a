# -*- test-case-name: ngrokd.test.test_api -*-
"""
The failures of a call to ngrok's API, in the four kinds a caller can act
on: L{APIError} (ngrok answered with an error status), L{APIUnavailable}
(no answer: refused, timed out, TLS failed), L{APIResponseInvalid} (an
answer that is not what ngrok's API promises), L{NoAPIKey}. Apart from the
client (L{ngrokd.ngrok.api}) so that what reads answers and what handles
failures need not import it.

None of their messages ever contains the API key, even where ngrok quotes
it back (it does, for a wrong key): L{redact} takes it out.
"""

from __future__ import annotations

#: Per error code, what it means for ngrokd and what to do.
_HINTS = {
    "ERR_NGROK_19002": (
        "the ngrok account of this API key does not have the Kubernetes"
        " Operators and Bindings feature that ngrokd needs; ask ngrok to"
        " enable it for the account, or use an API key of an account that has it"
    ),
    "ERR_NGROK_200": "no API key was sent",
    "ERR_NGROK_202": "the API key is not valid; check api.key or NGROK_API_KEY",
    "ERR_NGROK_203": "the API key is not valid; check api.key or NGROK_API_KEY",
}

_REDACTED = "[redacted]"


def redact(text: str, key: str) -> str:
    """
    C{text} without the API key C{key}.
    """
    return text.replace(key, _REDACTED) if key else text


class NoAPIKey(Exception):
    """
    There is no API key to call ngrok's API with.
    """

    def __str__(self) -> str:
        return (
            "no ngrok API key: set api.key in the config, NGROK_API_KEY in the"
            " environment, or run ngrokctl set-api-key"
        )


class APIError(Exception):
    """
    ngrok answered with an error: HTTP C{status}, ngrok's C{error_code} (not
    every error has one), its message, its operation id (what ngrok's support
    asks for), for 429/503 the C{Retry-After} delay in seconds if given, and
    the C{request} it answered (C{"GET /kubernetes_operators/..."}).
    """

    def __init__(
        self,
        status: int,
        error_code: str | None,
        message: str,
        operation_id: str | None,
        retry_after: float | None = None,
        request: str = "",
    ) -> None:
        super().__init__(status, error_code, message, operation_id)
        self.status = status
        self.error_code = error_code
        self.message = message
        self.operation_id = operation_id
        self.retry_after = retry_after
        self.request = request

    def __str__(self) -> str:
        text = f"ngrok API error {self.status}"
        if self.request:
            text += f" for {self.request}"
        if self.error_code:
            text += f" {self.error_code}"
        text += f": {self.message}"
        hint = _HINTS.get(self.error_code or "")
        if hint:
            text += f" ({hint})"
        if self.retry_after is not None:
            text += f"; retry after {self.retry_after:g}s"
        if self.operation_id:
            text += f" [operation {self.operation_id}]"
        return text


def failure_kind(error: BaseException | None) -> str:
    """
    What identifies a failure for "log it once": ngrok's status and error
    code for an API error (its message and operation id differ at every
    request), the message otherwise.
    """
    if isinstance(error, APIError):
        return f"{error.status} {error.error_code or ''}"
    return f"{type(error).__name__}: {error}"


class APIUnavailable(Exception):
    """
    No answer from ngrok's API at C{url}: connection refused, name not
    found, timeout, TLS failure (untrusted certificate...), dropped connection.
    """

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(url, reason)
        self.url = url
        self.reason = reason

    def __str__(self) -> str:
        return f"ngrok API at {self.url} unavailable: {self.reason}"


class APIResponseInvalid(Exception):
    """
    The answer from C{url} is not what ngrok's API promises: C{field} (a
    dotted path into the JSON, or "body") is C{problem}.
    """

    def __init__(self, url: str, field: str, problem: str) -> None:
        super().__init__(url, field, problem)
        self.url = url
        self.field = field
        self.problem = problem

    def __str__(self) -> str:
        return (
            f"invalid ngrok API response from {self.url}: {self.field}: {self.problem}"
        )


class PaginationError(APIResponseInvalid):
    """
    Following C{next_page_uri} does not end: a page names one already read,
    or there are more pages than any account should have.
    """


#: The failures an API call is expected to have; any other is a fault in
#: ngrokd, to be logged with its traceback.
EXPECTED_FAILURES = (APIError, APIUnavailable, APIResponseInvalid, NoAPIKey)
