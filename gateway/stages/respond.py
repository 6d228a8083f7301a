"""Stage: respond. Sends what ``forward`` held back, after ``persist``; sets ``response``.

Non-streaming: the upstream's body with its status (a 4xx/5xx passes through unchanged).
Streaming: the held-back ``[DONE]``; a stream cut off by the upstream ends with an SSE error
event instead, so the client can tell it is incomplete.

When the record step failed (``record_error``), nothing held back is sent: raises
``RecordFailed``, which the handler turns into an error status (JSON) or an SSE error event
without ``[DONE]`` (stream).
"""

from __future__ import annotations

import orjson
from aiohttp import web

from gateway.context import Context
from gateway.errors import RecordFailed


async def respond(ctx: Context) -> None:
    if ctx.record_error:
        raise RecordFailed()
    if ctx.response is None:
        ctx.response = web.Response(status=ctx.upstream_status, body=ctx.tail,
                                    content_type=ctx.tail_type or "application/json",
                                    headers=ctx.tail_headers)
        return
    out = ctx.response
    assert isinstance(out, web.StreamResponse)
    if ctx.ended_by == "client":
        return
    try:
        if ctx.outcome != "completed":
            err = {"error": {"message": "the upstream model broke off its reply; the partial round was recorded "
                             "as incomplete", "type": "upstream_error", "code": "upstream_incomplete"}}
            await out.write(b"data: " + orjson.dumps(err) + b"\n\n")
        elif ctx.tail:
            await out.write(ctx.tail)
        await out.write_eof()
    except (ConnectionResetError, OSError):
        pass
