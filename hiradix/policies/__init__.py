"""Pure policies: eviction orders and prefetch policies (no IO, no locks)."""
