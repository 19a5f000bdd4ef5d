"""Pure: the copy of a message that goes to the dead-letter topic, within the real service's limits.

The emulator enforces none of these limits, so unit tests hold them: at most 100 attributes,
keys of at most 256 bytes and values of at most 1,024 bytes (UTF-8), at most 10 MB in all. A copy the
service rejects would fail forever, so: consumerd's own attributes always fit; an original with too
many attributes keeps the first ones and folds the rest into `consumerd_folded_attributes` (JSON, cut
at 1,024 bytes); the error text is cut at 1,024 bytes on a character boundary.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

MAX_ATTRIBUTES = 100
MAX_VALUE_BYTES = 1024
MAX_MESSAGE_BYTES = 10_000_000
FOLDED = "consumerd_folded_attributes"


def cut_utf8(text: str, limit: int = MAX_VALUE_BYTES) -> str:
    """``text`` cut to at most ``limit`` bytes of UTF-8, never inside a character."""
    return text.encode("utf-8", "replace")[:limit].decode("utf-8", "ignore")  # lone surrogates become "?"


def copy_attributes(original: Mapping[str, str], ours: Mapping[str, str]) -> dict[str, str]:
    """The dead-letter copy's attributes: ``ours`` (consumerd_*) win, the original's fill the rest."""
    mine = {key: cut_utf8(value) for key, value in ours.items()}
    theirs = [(k, v) for k, v in original.items() if k not in mine]
    room = MAX_ATTRIBUTES - len(mine)
    if len(theirs) > room:
        room -= 1  # one slot for the folded rest
        folded = dict(theirs[room:])
        mine[FOLDED] = cut_utf8(json.dumps(folded, ensure_ascii=False, separators=(",", ":")))
        theirs = theirs[:room]
    return {**dict(theirs), **mine}


def copy_size(data: bytes, attributes: Mapping[str, str]) -> int:
    return len(data) + sum(len(k.encode()) + len(v.encode()) for k, v in attributes.items())
