"""GitLab client errors, grouped by how a caller recovers.

    GitLabError
    ├── FatalGitLabError        401/403: the token is wrong or lacks rights; stop the round
    ├── NotFoundError           404: the project or user is gone; skip it
    ├── BadRequestError         other 4xx: our request is wrong; report it
    ├── ResponseTooLargeError   the body is over GITLAB_MAX_BODY; retrying cannot help
    └── RetriesExhaustedError   429/5xx/timeouts/bad bodies outlasted the retry budget

Transport failures (no response) and bad statuses are retried inside the client and only
surface as RetriesExhaustedError; httpx exceptions never leave the ``gitlab`` package.
"""

from __future__ import annotations


class GitLabError(Exception):
    """Base of every error the GitLab client raises."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class FatalGitLabError(GitLabError):
    """Authentication or authorisation failed: retrying cannot help."""


class NotFoundError(GitLabError):
    """The resource does not exist (any more)."""


class BadRequestError(GitLabError):
    """GitLab refused the request as malformed."""


class ResponseTooLargeError(GitLabError):
    """The answer's body is larger than the configured cap (``GITLAB_MAX_BODY``)."""


class RetriesExhaustedError(GitLabError):
    """A retriable failure persisted beyond the retry budget. After a 429, ``retry_in_s`` is
    how long GitLab asked to wait (or our capped backoff when it said nothing)."""

    def __init__(self, message: str, status: int | None = None,
                 retry_in_s: float | None = None) -> None:
        super().__init__(message, status)
        self.retry_in_s = retry_in_s
