"""The pause before retrying after a failure: doubling, capped, reset by a success."""

from __future__ import annotations

# An outage's retries settle at one attempt every half minute: often enough to resume
# soon after the database returns, rare enough not to flood its log meanwhile.
RECONNECT_MAX_SECONDS = 30.0


class Backoff:
    def __init__(self, first: float = 0.5, cap: float = RECONNECT_MAX_SECONDS) -> None:
        self.first = first
        self.cap = cap
        self.delay = first

    def next_delay(self) -> float:
        """The pause to take now; the one after it is twice as long, up to the cap."""
        delay = self.delay
        self.delay = min(delay * 2, self.cap)
        return delay

    def reset(self) -> None:
        self.delay = self.first
