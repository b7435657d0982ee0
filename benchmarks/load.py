"""Closed-loop load for the benchmark scripts: a number of clients share a count of
requests (or a time), and each sends its next one as soon as its previous one has ended."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import httpx

Send = Callable[[httpx.AsyncClient, int], Awaitable[None]]


async def closed_loop_clients(
    requests: int, clients: int, send: Send, seconds: float | None = None
) -> float:
    """Run ``send(client, index)`` for every index below ``requests`` from ``clients``
    concurrent loops over one connection pool; with ``seconds``, clients stop starting
    new requests once that much time has passed (the load is sized by time, ``requests``
    stays a bound for safety) and the ones in flight finish. Returns the wall time."""
    next_index = 0
    deadline = None if seconds is None else time.perf_counter() + seconds

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal next_index
        while next_index < requests and (deadline is None or time.perf_counter() < deadline):
            index = next_index
            next_index += 1
            await send(client, index)

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        return time.perf_counter() - start
