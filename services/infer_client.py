"""`onepool infer`: one request to one worker over NATS, the reply printed as JSON."""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from dataclasses import dataclass

import msgspec

from shared import schemas as s
from shared.bus import Bus
from shared.bus_auth import load_bus_auth
from shared.errors import EXIT_USAGE, OnepoolError, UsageError
from shared.telemetry import setup_telemetry


@dataclass(frozen=True)
class InferArgs:
    nats_url: str
    worker: str
    user_id: str
    history: list[int]
    timestamps: list[int] | None
    candidates: list[int]
    k: int | None
    timeout_s: float


async def infer_once(args: InferArgs) -> s.InferenceReply:
    request = s.InferenceRequest(
        request_id=uuid.uuid4().hex,
        user_id=args.user_id,
        history=args.history,
        timestamps=args.timestamps,
        candidates=args.candidates,
        k=args.k,
        deadline_ms=args.timeout_s * 1e3,
    )
    # Credentials and TLS files as every service takes them (ONEPOOL_NATS_*).
    bus = await Bus.connect(args.nats_url, name="onepool-infer", auth=load_bus_auth())
    try:
        raw = await bus.request(s.infer_subject(args.worker), s.encode(request), timeout_s=args.timeout_s)
    finally:
        await bus.close()
    return s.decode(s.decoder(s.InferenceReply), raw)


def run_infer(args: InferArgs) -> int:
    # Logs go to stderr, so that stdout carries only the reply.
    telemetry = setup_telemetry("onepool-infer")
    try:
        reply = asyncio.run(infer_once(args))
    except s.DecodeError as exc:
        print(f"onepool infer: the reply did not decode: {exc.message}", file=sys.stderr)
        return 1
    except UsageError as exc:  # e.g. bad ONEPOOL_NATS_* credentials settings
        print(f"onepool infer: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    except OnepoolError as exc:
        print(f"onepool infer: {exc.message}", file=sys.stderr)
        return 1
    finally:
        telemetry.shutdown()
    print(json.dumps(msgspec.to_builtins(reply), indent=2))
    return 0 if reply.error is None else 1
