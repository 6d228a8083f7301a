"""A forwarded route's audit entry and log line name the kind of object reached, never its id:
a provider-held response's id continues its conversation, a file's id reads the file."""

from __future__ import annotations

from collections.abc import Callable

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
