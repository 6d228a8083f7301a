"""A forwarded route's audit entry and log line name the kind of object reached, never its id:
a provider-held response's id continues its conversation, a file's id reads the file."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.conftest import ACME_KEY, Gateway
from tests.hostile.test_forward_routes import connect, proxied
from tests.provider import Provider, provider  # noqa: F401

AUTH = {"Authorization": f"Bearer {ACME_KEY}"}


def test_forwarded_ids_stay_out_of_audit_and_logs(make_gateway: Callable[..., Gateway],
                                                  provider: Provider) -> None:  # noqa: F811
    """Per-id routes are audited and logged as templates (``/v1/files/{id}/content``): no id, no
    model name, nothing a client wrote into the path, while the route words stay."""
    gateway = connect(make_gateway, provider.url, forward_routes=["models", "files", "responses"])
    for method, path in [("GET", "/files/file-XYZ7q/content"), ("DELETE", "/files/file-XYZ7q"),
                         ("GET", "/models/gpt-y"), ("GET", "/responses/resp_up1abc/input_items"),
                         ("GET", "/files/made-up-7q%20text/content"), ("GET", "/models")]:
        resp = httpx.request(method, f"{gateway.base_url}{path}", headers=AUTH, timeout=30)
        assert resp.status_code < 500, (path, resp.text)
    assert [e["route"] for e in proxied(gateway)] == [
        "/v1/files/{id}/content", "/v1/files/{id}", "/v1/models/{id}", "/v1/responses/{id}/input_items",
        "/v1/files/{id}/content", "/v1/models"]
    logged = gateway.log_path.read_text()
    assert '"route": "/v1/responses/{id}/input_items"' in logged or '"route":"/v1/responses/{id}/input_items"' in logged
    audited = repr(gateway.audit_entries())
    for said in ("XYZ7q", "resp_up1abc", "gpt-y", "made-up"):
        assert said not in logged and said not in audited, said


def test_a_refused_body_on_a_per_id_route_logs_the_template(tmp_path: Path, provider: Provider) -> None:  # noqa: F811
    """A body whose chunked framing breaks after the handler began reading it, on a per-id route,
    is refused before the route logs its own line: that refusal's log line names the route's
    template, never the id in the path (the real listener: ``sessiongate serve``)."""
    import socket
    import time

    from tests.hostile.subprocess_gateway import served_gateway

    upstreams = [{"name": "provider", "base_url": provider.url, "models": ["*"], "forward_routes": ["models"]}]
    with served_gateway(tmp_path / "gw", upstreams=upstreams) as served:
        answers = []
        for path in ("/v1/models/model-SECRET9z", "/v1/chat/completions"):
            with socket.create_connection(("127.0.0.1", served.port), timeout=30) as sock:
                sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\n"
                             f"Authorization: Bearer {ACME_KEY}\r\nContent-Type: application/json\r\n"
                             "Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n".encode())
                time.sleep(0.5)  # the handler is reading the body now
                sock.sendall(b"zz\r\nbroken\r\n")
                answers.append(sock.recv(65536))
        logged = served.stderr()
    assert all(answer.startswith(b"HTTP/1.1 400") for answer in answers), answers
    assert "bad_request_body" in logged, logged[-2000:]
    assert "SECRET9z" not in logged, logged[-2000:]
    # the model route's own line says what the client got, not the handler's default 500
    (line,) = [json.loads(line) for line in logged.splitlines() if '"event":"request"' in line]
    assert line["status"] == 400, line
