"""Retrying a shared-folder call: a Drive mount throttles bursts and drops calls now and then, an object store
answers 503 under load. Doubling waits with jitter, a bounded number of tries, and a warning per retry."""

import logging
import random
import time
from typing import Callable, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


_JITTER = random.Random()     # its own stream: retries never shift a seeded draw of the training


def backoff_s(attempt: int, first_wait_s: float, rng: random.Random = _JITTER) -> float:
    """The wait before retry `attempt` (1, 2, ...): doubling, with jitter of +-50% so that nodes throttled by
    the same Drive at the same moment do not all come back at the same moment."""
    return first_wait_s * 2 ** (attempt - 1) * rng.uniform(0.5, 1.5)


def with_retries(action: Callable[[], T], what: str, attempts: int = 4, first_wait_s: float = 0.5,
                 retry_missing: bool = True) -> T:
    """Retry an OSError with exponential backoff and jitter: a Drive mount throttles bursts and drops calls
    now and then. At most `attempts` tries, about 0.5 + 1 + 2 s of waiting with the defaults.

    retry_missing=False: a FileNotFoundError is raised at once (a read of a file not there yet).
    """
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except OSError as exc:
            if attempt == attempts or (not retry_missing and isinstance(exc, FileNotFoundError)):
                raise
            wait = backoff_s(attempt, first_wait_s)
            log.warning("%s failed (%s); retry %d/%d in %.1fs", what, exc.strerror or exc, attempt,
                        attempts - 1, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")
