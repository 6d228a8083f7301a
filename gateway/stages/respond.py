"""Stage: respond. Sends what ``forward`` held back, after ``persist``; sets ``response``.

Non-streaming: the upstream's body with its status (a 4xx/5xx passes through unchanged), sent
here, so the access log line and the metrics that follow are written after the client has it.
Streaming: the held-back ``[DONE]``; a stream cut off by the upstream ends with an SSE error
event instead, so the client can tell it is incomplete (or, when the client holds an unended
event, ``event_open``, with a closed connection: its decoder drops the unended event; or with
nothing more when the provider's own error event was the last one, ``error_relayed``). A
truncated recording (``reply_truncated``) still gives the client the whole reply. A non-SSE
body relayed early (over the reply cap) gets its held-back last piece; if the upstream broke it
off, the connection is closed instead, so the client sees a cut-off body and never a second
status line.

When the record step failed (``record_error``), nothing held back is sent: raises
``RecordFailed``, which the handler turns into an error status (JSON) or an SSE error event
without ``[DONE]`` (stream).
"""

from __future__ import annotations

from aiohttp import web

from gateway.context import Context
from gateway.errors import RecordFailed


async def respond(ctx: Context) -> None:
    if ctx.record_error:
        raise RecordFailed()
    if ctx.response is None and ctx.ended_by == "client":
        return  # the client left before its reply came: nothing to send, nobody to send it to
    if ctx.response is None:
        reply = ctx.response = web.Response(status=ctx.upstream_status, body=ctx.tail,
                                            content_type=ctx.tail_type or "application/json",
                                            headers=ctx.tail_headers)
        try:
            await reply.prepare(ctx.request)
            await reply.write_eof()
        except (ConnectionResetError, OSError):
            pass  # the client is gone; the round was recorded already
        return
    out = ctx.response
    assert isinstance(out, web.StreamResponse)
    if ctx.ended_by == "client":
        return
    if ctx.ended_by == "upstream" and (ctx.event_open or out.content_type != "text/event-stream"):
        end_connection(ctx.request, out)  # a relayed body, or an event, that broke off: nothing may go inside it
        return
    try:
        if ctx.ended_by == "upstream" and ctx.error_relayed:
            await out.write_eof()  # the provider's own error event said why: no second one after it
        elif ctx.ended_by == "upstream":
            kept = ("the partial round was recorded as incomplete" if ctx.session_id is not None
                    else "its audit entry says so (no session: nothing of it was recorded)")
            err = {"error": {"message": f"the upstream model broke off its reply; {kept}",
                             "type": "upstream_error", "code": "upstream_incomplete"}}
            await out.write_eof(ctx.codec.stream_error(err, ctx.stream_seq))
        else:
            await out.write_eof(ctx.tail)  # the held-back end and the end of the body: one send
    except (ConnectionResetError, OSError):
        pass


def end_connection(request: web.Request, out: web.StreamResponse) -> None:
    """End a reply whose body already started by closing the connection."""
    out.force_close()
    if request.transport is not None:
        request.transport.close()
