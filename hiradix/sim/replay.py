"""Mooncake-format request traces: loading and expanding block ids into token ids.

Each line is ``{"timestamp": ms, "input_length": n, "output_length": m, "hash_ids": [...]}``
with one id per 512-token block of the prompt (two prompts share an id only when they
share the whole prefix up to and including that block). Block ``h`` expands to the 512
token ids ``h * 512 + i`` (deterministic, distinct per block); the last block is cut to
``input_length - 512 * (len(hash_ids) - 1)`` tokens. Optional keys ``session_id`` and
``namespace`` are passed through when present.
"""

from __future__ import annotations

import json
import logging
import os
from array import array
from collections.abc import Hashable
from dataclasses import dataclass

logger = logging.getLogger(__name__)

BLOCK_TOKENS = 512


@dataclass(frozen=True, slots=True)
class TraceRequest:
    index: int
    arrival: float  # seconds from the trace's start
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]
    session_id: str | None = None
    namespace: Hashable = ""

    @property
    def request_id(self) -> str:
        return f"r{self.index}"

    def tokens(self) -> array:
        """The prompt's token ids (int64)."""
        out = array("q")
        n = len(self.hash_ids)
        for pos, block in enumerate(self.hash_ids):
            base = block * BLOCK_TOKENS
            size = BLOCK_TOKENS if pos < n - 1 else self.input_length - BLOCK_TOKENS * (n - 1)
            out.extend(range(base, base + max(0, min(size, BLOCK_TOKENS))))
        return out


def parse_trace_line(line: str, index: int) -> TraceRequest:
    row = json.loads(line)
    try:
        hash_ids = tuple(int(h) for h in row["hash_ids"])
        input_length = int(row["input_length"])
        request = TraceRequest(
            index=index,
            arrival=float(row["timestamp"]) / 1000.0,
            input_length=input_length,
            output_length=int(row.get("output_length", 0)),
            hash_ids=hash_ids,
            session_id=row.get("session_id"),
            namespace=row.get("namespace", ""),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"trace line {index + 1}: {error!r}") from None
    if hash_ids and not (
        BLOCK_TOKENS * (len(hash_ids) - 1) < input_length <= BLOCK_TOKENS * len(hash_ids)
    ):
        raise ValueError(
            f"trace line {index + 1}: input_length {input_length} does not fit "
            f"{len(hash_ids)} blocks of {BLOCK_TOKENS}"
        )
    return request


def load_trace(path: str | os.PathLike[str], limit: int | None = None) -> list[TraceRequest]:
    """The requests of a JSONL trace (the first ``limit``), sorted by arrival (stable)."""
    requests: list[TraceRequest] = []
    with open(path, encoding="utf-8") as file:
        for line in file:
            if not line.strip():
                continue
            if limit is not None and len(requests) >= limit:
                break
            requests.append(parse_trace_line(line, len(requests)))
    requests.sort(key=lambda r: r.arrival)
    return requests


def distinct_tokens(requests: list[TraceRequest]) -> int:
    """Tokens an unbounded prefix cache would hold after the whole trace."""
    seen: set[int] = set()
    total = 0
    for request in requests:
        n = len(request.hash_ids)
        for pos, block in enumerate(request.hash_ids):
            if block not in seen:
                seen.add(block)
                total += (
                    BLOCK_TOKENS if pos < n - 1 else request.input_length - BLOCK_TOKENS * (n - 1)
                )
    return total
