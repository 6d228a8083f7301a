"""Memory the gateway holds while it relays one large non-streamed reply (issue 9, item 4).

Runs a provider that sends a chat completion of ``--mb`` megabytes (generated piece by piece,
gzip-compressed when asked) and a gateway with ``max_reply_bytes`` = ``--cap-mb``, in this
process; a raw-socket client reads the reply and throws it away. Prints how much the process's
peak resident memory (``ru_maxrss``) grew during the request, i.e. what the gateway (and the
small provider and client) held at most, next to the reply size. (``tracemalloc`` is not used:
it counts orjson's parse buffers at several times what they make resident.)

    python -m benchmarks.big_reply [--mb 100] [--cap-mb 8] [--gzip] [--no-session]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import socket
import tempfile
import zlib
from pathlib import Path

import orjson
import yaml
from aiohttp import web

from gateway import logs
from gateway.app import build_app
from gateway.settings import load_settings

REPO = Path(__file__).resolve().parent.parent


def provider_app(size: int, compress: bool) -> web.Application:
    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        head = b'{"id":"c","object":"chat.completion","model":"m","choices":[{"index":0,"message":' \
               b'{"role":"assistant","content":"'
        tail = b'"},"finish_reason":"stop"}]}'
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        comp = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS) if compress else None
        if comp:
            resp.headers["Content-Encoding"] = "gzip"
        await resp.prepare(request)
        piece = b"x" * 65536
        for part in [head, *([piece] * (size // len(piece))), tail]:
            await resp.write(comp.compress(part) + comp.flush(zlib.Z_SYNC_FLUSH) if comp else part)
        if comp:
            await resp.write(comp.flush())
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


async def serve(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, int(runner.addresses[0][1])


def read_all(port: int, session: bool) -> int:
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "big"}]})
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sg-demo-acme\r\n"
                     + (b"X-Session-Id: big\r\n" if session else b"")
                     + b"Content-Type: application/json\r\nConnection: close\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        total = 0
        while chunk := sock.recv(1 << 16):
            total += len(chunk)
    return total


async def main_async(mb: int, cap_mb: int, compress: bool, session: bool) -> None:
    up_runner, up_port = await serve(provider_app(mb * 1024 * 1024, compress))
    with tempfile.TemporaryDirectory() as tmp:
        config = yaml.safe_load((REPO / "config/sessiongate.yaml").read_text())
        config["upstreams"] = [{"name": "big", "base_url": f"http://127.0.0.1:{up_port}/v1",
                                "accept_encoding": "gzip" if compress else "identity",
                                "max_reply_bytes": cap_mb * 1024 * 1024}]
        config["store"] = {"path": f"{tmp}/g.db"}
        config["keys"] = {"master_key_file": f"{tmp}/keys.json"}
        config["policies"] = {"path": str(REPO / "policies")}
        config["audit"] = {"signing_key_file": f"{tmp}/sign.key", "checkpoint_file": f"{tmp}/cp.jsonl"}
        (Path(tmp) / "c.yaml").write_text(yaml.safe_dump(config))
        logs.configure("warning", "json", stream=open(f"{tmp}/log", "w"))  # noqa: SIM115
        gw_runner, gw_port = await serve(build_app(load_settings(Path(tmp) / "c.yaml")))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        total = await asyncio.get_running_loop().run_in_executor(None, read_all, gw_port, session)
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
        kind = "recorded in a session" if session else "no session (audited only)"
        print(f"reply {mb} MB{' gzip' if compress else ''}, cap {cap_mb} MiB, {kind}: client got {total / 1e6:.1f} MB, "
              f"peak RSS grew by {peak / 1e6:.1f} MB")
        await gw_runner.cleanup()
    await up_runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--cap-mb", type=int, default=8)
    parser.add_argument("--gzip", action="store_true")
    parser.add_argument("--no-session", action="store_true", help="audit only, record nothing")
    args = parser.parse_args()
    asyncio.run(main_async(args.mb, args.cap_mb, args.gzip, not args.no_session))


if __name__ == "__main__":
    main()
