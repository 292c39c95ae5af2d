"""Event pages: each event's raw JSON bytes, plus the four fields the sync needs.

The page is split into per-event byte slices without building dictionaries (msgspec's
``Raw``), and only ``id``, ``project_id``, ``author_id`` and ``created_at`` are decoded. The
bytes GitLab sent are what goes to Kafka: the message value is the event exactly as returned.

An event without an integer ``id`` or a ``created_at`` time (or with a non-integer
``project_id`` / ``author_id``) cannot be deduplicated or placed behind a cursor: it is left
out of the page and reported in :attr:`EventPage.malformed`; the page's other events stay.
"""

from __future__ import annotations

from datetime import datetime

import msgspec


class _Head(msgspec.Struct):
    id: int
    created_at: datetime
    project_id: int | None = None
    author_id: int | None = None


_RAWS = msgspec.json.Decoder(list[msgspec.Raw])
_HEADS = msgspec.json.Decoder(list[_Head])
_HEAD = msgspec.json.Decoder(_Head)


class Event(msgspec.Struct, frozen=True):
    """One event: what the sync reads of it, and its original JSON. (A Struct, not a frozen
    dataclass: built for every event, and a frozen dataclass's ``__init__`` is Python code.)"""

    id: int
    project_id: int | None
    author_id: int | None
    created_ts: float
    raw: bytes


class EventPage(list[Event]):
    """The good events of a page, in order; ``malformed`` says why each left-out one was."""

    malformed: list[str]

    def __init__(self, events: list[Event], malformed: list[str] | None = None) -> None:
        super().__init__(events)
        self.malformed = malformed or []


def decode_events(body: bytes) -> EventPage:
    """A page of events; raises ValueError on anything but a JSON array (truncated, HTML, an
    object): such a body is retried. Events that are not events are left out, not fatal.

    Two passes over the page in C (the heads, then each event's byte slice) cost less than
    decoding every slice on its own from Python; only a page with a bad event pays for that."""
    raws = _RAWS.decode(body)
    try:
        heads = _HEADS.decode(body)
    except msgspec.ValidationError:
        return _one_by_one(raws)
    return EventPage([Event(head.id, head.project_id, head.author_id,
                            head.created_at.timestamp(), bytes(raw))
                      for head, raw in zip(heads, raws, strict=True)])


def _one_by_one(raws: list[msgspec.Raw]) -> EventPage:
    events, malformed = [], []
    for raw in raws:
        try:
            head = _HEAD.decode(raw)
        except msgspec.ValidationError as exc:
            malformed.append(f"{exc} in {bytes(raw)[:120]!r}")
            continue
        events.append(Event(head.id, head.project_id, head.author_id,
                            head.created_at.timestamp(), bytes(raw)))
    return EventPage(events, malformed)
