"""Signatures the view has checked once: the dashboard rebuilds its table four times a second from the same
heartbeats, and verifying each one's Ed25519 signature again was a few percent of a core per swarm."""

import hashlib
from collections import OrderedDict
from typing import Any

from workers.shared_folder.json_records import canonical_json
from workers.shared_folder.signing import KeyRing

# verdicts kept: a heartbeat per node, the newest round states, finished.json; a peer flooding peers/ with new
# records evicts old verdicts (each then costs one verification again), it never grows the memory
KEPT_VERDICTS = 1024


class RememberedVerdicts:
    """`keyring.verify`, with each good verdict remembered by the record's whole content, its signature included:
    an unchanged record is not verified again, a record changed in any byte that counts always is, and a refused
    one is never remembered (it is refused again, and named, each time it is read)."""

    def __init__(self, keyring: KeyRing, keep: int = KEPT_VERDICTS):
        self.keyring, self.keep = keyring, keep
        self._good: OrderedDict[tuple[str, bytes], dict[str, Any]] = OrderedDict()

    def verify(self, record: dict[str, Any], node: str, where: str) -> dict[str, Any]:
        """As KeyRing.verify: the record without its signature when it is `node`'s; RejectedFile otherwise."""
        try:
            seen = (node, hashlib.sha256(canonical_json(record, without=())).digest())
        except (TypeError, ValueError):     # no canonical form (a NaN): the keyring judges it, as always
            return self.keyring.verify(record, node, where)
        body = self._good.get(seen)
        if body is None:
            body = self._good[seen] = self.keyring.verify(record, node, where)
            while len(self._good) > self.keep:
                self._good.popitem(last=False)
        else:
            self._good.move_to_end(seen)
        return dict(body)        # the caller's own dict: a key it sets or drops changes no verdict kept
