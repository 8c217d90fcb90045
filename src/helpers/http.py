"""What the project's HTTP clients (Civitai, OpenAI-compatible endpoints) share: when to retry, how long to wait."""
from __future__ import annotations

import email.utils
import random
import time

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


def backoff_delay(attempt: int, retry_after: str | None, base: float, cap: float, rng: random.Random) -> float:
    """Seconds to wait before retry `attempt` (0-based).

    The server's `Retry-After` wins when present (seconds or an HTTP date); otherwise base·2^attempt with
    ±50 % jitter, so that many clients backing off together do not retry in lockstep. Capped at `cap`.
    """
    if retry_after:
        try:
            return min(max(float(retry_after), 0.0), cap)
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(retry_after)
                return min(max(0.0, when.timestamp() - time.time()), cap)
            except (TypeError, ValueError):  # unreadable header: use our own schedule
                pass
    return min(cap, base * 2 ** attempt) * rng.uniform(0.5, 1.5)
