"""Closed-loop load for the benchmark scripts: a number of clients share a fixed count of
requests, and each sends its next one as soon as its previous one has ended."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import httpx

Send = Callable[[httpx.AsyncClient, int], Awaitable[None]]


async def closed_loop_clients(requests: int, clients: int, send: Send) -> float:
    """Run ``send(client, index)`` for every index below ``requests`` from ``clients``
    concurrent loops over one connection pool; the wall time in seconds."""
    next_index = 0

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal next_index
        while next_index < requests:
            index = next_index
            next_index += 1
            await send(client, index)

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        return time.perf_counter() - start


async def timed_closed_loop_clients(
    seconds: float, clients: int, send: Send, max_requests: int = 100_000
) -> float:
    """Like ``closed_loop_clients`` but sized by time: clients start new requests until
    ``seconds`` have passed (or ``max_requests`` were started, a bound for safety); the
    requests in flight then finish. Returns the wall time."""
    started = 0
    deadline = time.perf_counter() + seconds

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal started
        while time.perf_counter() < deadline and started < max_requests:
            index = started
            started += 1
            await send(client, index)

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        return time.perf_counter() - start
