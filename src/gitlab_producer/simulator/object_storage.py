"""Object storage with direct download, as GitLab uses it for job artifacts.

With object storage and ``proxy_download: false`` (GitLab's default; see
``doc/administration/object_storage.md``), GitLab answers an artifact download with a 302 to
a short-lived signed URL of the bucket, usually on another host. The bucket authenticates
the signature in the query only; a client that sends its GitLab token there leaks it to the
storage provider, which this stand-in counts.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
from collections import OrderedDict

from aiohttp import web

MAX_OBJECTS = 200
EXPIRES_S = 600


class ObjectStorage:
    """Signed URLs for answers handed to the bucket, and the bucket's side of them."""

    def __init__(self) -> None:
        self.base_url = ""  # e.g. http://localhost:PORT: on, downloads redirect there
        self.token_seen = 0  # requests to the bucket that carried a GitLab token
        self.served = 0
        self._key = secrets.token_bytes(16)
        self._objects: OrderedDict[str, tuple[bytes, str]] = OrderedDict()
        self._lock = threading.Lock()

    def redirect(self, answer: web.Response) -> web.Response:
        """The 302 GitLab sends instead of ``answer`` (which the bucket then serves)."""
        name = secrets.token_hex(8)
        with self._lock:
            self._objects[name] = (bytes(answer.body or b""),  # type: ignore[arg-type]
                                   answer.content_type)
            while len(self._objects) > MAX_OBJECTS:
                self._objects.popitem(last=False)
        signature = hmac.new(self._key, name.encode(), hashlib.sha256).hexdigest()
        location = (f"{self.base_url}/_object_storage/artifacts/{name}"
                    f"?X-Amz-Expires={EXPIRES_S}&X-Amz-Signature={signature}")
        return web.Response(status=302, headers={"Location": location})

    async def handle(self, request: web.Request) -> web.Response:
        """``GET /_object_storage/artifacts/{name}``: the signed object, or 403."""
        if "PRIVATE-TOKEN" in request.headers or "Authorization" in request.headers:
            with self._lock:
                self.token_seen += 1
        name = request.match_info["name"]
        expected = hmac.new(self._key, name.encode(), hashlib.sha256).hexdigest()
        given = request.query.get("X-Amz-Signature", "")
        with self._lock:
            found = self._objects.get(name)
        if found is None or not hmac.compare_digest(given, expected):
            return web.Response(status=403, text="<Error><Code>AccessDenied</Code></Error>",
                                content_type="application/xml")
        with self._lock:
            self.served += 1
        return web.Response(body=found[0], content_type=found[1])
