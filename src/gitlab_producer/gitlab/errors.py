"""GitLab client errors, grouped by how a caller recovers.

    GitLabError
    ├── FatalGitLabError        401: the token itself is rejected; stop the round (at start-up,
    │                           ``GET /user`` answering 401 or 403 stops the service)
    ├── ForbiddenError          403 on one project's or user's list: that entity's problem;
    │                           skip it and retry it in later rounds (on a listing such as
    │                           ``GET /projects`` the sync raises FatalGitLabError instead)
    ├── NotFoundError           404: the project or user is gone; skip it
    ├── BadRequestError         other 4xx: our request is wrong; report it
    ├── ResponseTooLargeError   the body is over GITLAB_MAX_BODY; retrying cannot help
    ├── PaginationError         a list that loops or offers more pages than any real list has
    └── RetriesExhaustedError   429/5xx/timeouts/bad bodies outlasted the retry budget

Transport failures (no response) and bad statuses are retried inside the client and only
surface as RetriesExhaustedError; aiohttp exceptions never leave the ``gitlab`` package.
"""

from __future__ import annotations


class GitLabError(Exception):
    """Base of every error the GitLab client raises."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class FatalGitLabError(GitLabError):
    """Authentication failed: retrying cannot help until the token is fixed."""


class ForbiddenError(GitLabError):
    """The token may not read this resource (a 403): a problem of one entity, not of all."""


class NotFoundError(GitLabError):
    """The resource does not exist (any more)."""


class BadRequestError(GitLabError):
    """GitLab refused the request as malformed."""


class ResponseTooLargeError(GitLabError):
    """The answer's body is larger than the configured cap (``GITLAB_MAX_BODY``)."""
class PaginationError(GitLabError):
    """A list's pagination never ends: a repeated page, or more pages than the cap."""


class RetriesExhaustedError(GitLabError):
    """A retriable failure persisted beyond the retry budget. After a 429, ``retry_in_s`` is
    how long GitLab asked to wait (or our capped backoff when it said nothing)."""

    def __init__(self, message: str, status: int | None = None,
                 retry_in_s: float | None = None) -> None:
        super().__init__(message, status)
        self.retry_in_s = retry_in_s
