"""What may name a place in the artifact store: commits, relative paths and object keys.

Every part of ``<project_id>/<commit_sha>/<path>`` comes from outside (a hook, a rule, a
request), so each is checked here before it is joined, and the store checks the joined path
again once resolved (:meth:`gitlab_producer.capture.ArtifactStore.target`).

- :func:`commit_sha`: a Git commit id, 40 (SHA-1) or 64 (SHA-256) hex characters, lower-cased.
- :func:`relative_path`: a relative file path of non-empty segments, without ``.``/``..``,
  a leading ``/``, backslashes, NUL or other control characters.
- :func:`project_segment`: a positive project id.
- :func:`object_key`: the three checked and joined.
- :func:`upload_key`: ``<project_id>/uploads/<secret>/<name>`` of a markdown upload: a secret
  of 32 hex characters and a name that is one safe segment.

Each raises :class:`UnsafePathError` (a ``ValueError``) naming what is wrong.
"""

from __future__ import annotations

import re

MAX_PATH_CHARS = 4096
_COMMIT_RE = re.compile(r"(?:[0-9a-fA-F]{40}|[0-9a-fA-F]{64})")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


class UnsafePathError(ValueError):
    """A commit, project id or path that could name a place outside the artifact store."""


def commit_sha(text: object) -> str:
    """``text`` when it is a full commit id (40 or 64 hex characters), lower-cased."""
    if not isinstance(text, str) or not _COMMIT_RE.fullmatch(text):
        raise UnsafePathError("commit must be 40 or 64 hexadecimal characters")
    return text.lower()


def project_segment(project_id: object) -> str:
    """A project id as a path segment: a positive integer."""
    if isinstance(project_id, bool) or not isinstance(project_id, int) or project_id < 1:
        raise UnsafePathError("project id must be a positive integer")
    return str(project_id)


def relative_path(text: object) -> str:
    """``text`` unchanged when it is a safe relative path (``lib/class.rb``)."""
    if not isinstance(text, str) or not text:
        raise UnsafePathError("path must be a non-empty string")
    if len(text) > MAX_PATH_CHARS:
        raise UnsafePathError(f"path is longer than {MAX_PATH_CHARS} characters")
    if _CONTROL_RE.search(text):
        raise UnsafePathError("path must not contain NUL or control characters")
    if "\\" in text:
        raise UnsafePathError("path must not contain backslashes")
    if text.startswith("/"):
        raise UnsafePathError("path must be relative")
    for segment in text.split("/"):
        if segment in ("", ".", ".."):
            raise UnsafePathError("path must not have empty, '.' or '..' segments")
    return text


def object_key(project_id: int, commit: str, path: str) -> str:
    """``<project_id>/<commit>/<path>``, each part checked."""
    return f"{project_segment(project_id)}/{commit_sha(commit)}/{relative_path(path)}"


_SECRET_RE = re.compile(r"[0-9a-f]{32}")


def upload_key(project_id: int, secret: str, name: str) -> str:
    """``<project_id>/uploads/<secret>/<name>``, each part checked (``name`` decoded already:
    ``..%2Fx`` arrives here as ``../x`` and is refused)."""
    if not isinstance(secret, str) or not _SECRET_RE.fullmatch(secret):
        raise UnsafePathError("upload secret must be 32 lower-case hexadecimal characters")
    relative_path(name)
    if "/" in name:
        raise UnsafePathError("upload name must be one path segment")
    return f"{project_segment(project_id)}/uploads/{secret}/{name}"
