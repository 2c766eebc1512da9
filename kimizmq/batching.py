"""How a worker groups the data messages that arrive into the stage's forward
passes: waiting for the rest of a kept batch, splitting a first stage's wave
into one batch per pipeline stage, and holding a full stage's newcomers back.

Policy over what the stage holds (`Stage.requests`, `Stage.kept`), kept apart
from the stage's compute (stage.py, which runs whatever it is given) and from
the daemon's sockets (worker.py, which applies these decisions; `drain` only
reads what waits on the data socket it is handed).
"""

from __future__ import annotations

import math
import time

import zmq

from . import log, wire
from .stage import Stage

MAX_BATCH = 16  # data messages taken per loop round
PARTNER_WAIT_S = 0.002  # how long a stage waits for the rest of a kept batch's decode steps

logger = log.get_logger()


def drain(data: zmq.Socket, stage: Stage | None, have: list, counters: dict[str, int]) -> list:
    """What is waiting on the data socket, up to MAX_BATCH messages: decode
    steps of different requests that arrive together run as one batch.

    While a request here ran its last step in a kept batch whose other
    requests are not here yet (nor in `have`), this waits for them, up to
    PARTNER_WAIT_S: a round that caught only some would split the batch
    (smaller passes, and the kept batched caches merged anew)."""
    batch = [_decoded(data.recv_multipart(copy=False))]
    deadline = None
    while len(batch) < MAX_BATCH:
        try:
            batch.append(_decoded(data.recv_multipart(zmq.NOBLOCK, copy=False)))
            continue
        except zmq.Again:
            pass
        if not partners_missing(stage, [*have, *batch]):
            break
        if deadline is None:
            counters["partner_waits"] += 1
            deadline = time.monotonic() + PARTNER_WAIT_S
        left = deadline - time.monotonic()
        if left <= 0 or not data.poll(max(1, math.ceil(left * 1e3))):
            counters["partner_waits_expired"] += 1
            break
    return batch


def _decoded(frames) -> wire.Message | list:
    """A data message decoded, or its frames as they came if they do not decode
    (handle_data counts and reports those)."""
    try:
        return wire.decode(frames)
    except wire.WireError:
        return frames


def partners_missing(stage: Stage | None, batch: list) -> bool:
    """Whether a decode step in `batch` ran its last pass in a kept batch some
    of whose requests have sent nothing here yet (the previous stage sends a
    batch's steps one message each: a round that caught only some of them
    would split the batch)."""
    if stage is None or not stage.kept:
        return False
    here = {m.header["req"] for m in batch if isinstance(m, wire.Message) and m.kind in ("forward", "release")}
    return any(not key.isdisjoint(here) and not key <= here for key in stage.kept)


def micro_batches(stage: Stage, forwards: list[wire.Message], stages: int) -> list[list[wire.Message]]:
    """The first stage of `stages` keeps one batch per stage in flight: a wave
    larger than (requests in flight / stages) goes on in parts of that size,
    each sent as soon as it is computed, so the next stage works on one while
    this one computes the next, where a single batch would leave all stages
    but one idle. Later stages take what arrives."""
    if not stage.first or stages < 2 or len(forwards) < 2:
        return [forwards]
    in_flight = set(stage.requests).union(m.header["req"] for m in forwards)
    size = -(-len(in_flight) // stages)
    if len(forwards) <= size:
        return [forwards]
    return [forwards[i : i + size] for i in range(0, len(forwards), size)]


def opens(stage: Stage, header: dict) -> bool:
    """Whether a forward opens a request here: its first chunk, at offset 0 or
    where the prefix cache's entry it starts from ends."""
    start = header["prefix"]["length"] if "prefix" in header else 0
    return header["offset"] == start and header["req"] not in stage.requests


def admit(
    stage: Stage, forwards: list[wire.Message], waiting: set[str], counters: dict[str, int]
) -> tuple[list[wire.Message], list[wire.Message]]:
    """The forwards the stage runs now, and those that wait. A first chunk
    that finds the stage full waits its turn (its id joins `waiting`, and
    `admissions_deferred` counts it once), its later chunks behind it, until a
    release frees a slot."""
    room = stage.max_requests - len(stage.requests)
    now, later = [], []
    for m in forwards:
        req = m.header["req"]
        new = opens(stage, m.header)
        if new and room <= 0:
            if req not in waiting:
                counters["admissions_deferred"] += 1
                logger.info("admission_deferred", request_id=req, in_flight=len(stage.requests))
            waiting.add(req)
        if req in waiting and not (new and room > 0):
            later.append(m)
            continue
        waiting.discard(req)
        room -= new
        now.append(m)
    return now, later
