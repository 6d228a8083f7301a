"""Console form posts that cannot be read are 400 pages saying what to fix, signed in or not."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import Gateway
from tests.console.conftest import signed_in_client

MALFORMED = {
    "an unknown charset": ("application/x-www-form-urlencoded; charset=nonexistent-xyz", b"csrf=x&token=y",
                           "no codec for"),
    "multipart without a boundary": ("multipart/form-data", b"--x\r\n\r\n", "needs a boundary"),
    "broken part headers": ("multipart/form-data; boundary=x",
                            b"--x\r\nContent-Disposition form-data\r\n\r\nv\r\n--x--\r\n", "well-formed headers"),
    "a part without a name": ("multipart/form-data; boundary=x",
                              b"--x\r\nContent-Type: text/plain\r\n\r\nv\r\n--x--\r\n", "Content-Disposition"),
    "a part cut short": ("multipart/form-data; boundary=x",
                         b'--x\r\nContent-Disposition: form-data; name="a"\r\n\r\nv', "well-formed"),
    "an unknown transfer encoding": ("multipart/form-data; boundary=x",
                                     b'--x\r\nContent-Disposition: form-data; name="a"\r\n'
                                     b"Content-Transfer-Encoding: zzz\r\n\r\nv\r\n--x--\r\n", "well-formed"),
    "a part's unknown charset": ("multipart/form-data; boundary=x",
                                 b'--x\r\nContent-Disposition: form-data; name="a"\r\n'
                                 b"Content-Type: text/plain; charset=zzz\r\n\r\nv\r\n--x--\r\n", "no codec for"),
}


@pytest.mark.parametrize("case", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_form_post_is_400_saying_what_to_fix(console_gateway: Gateway,
                                                         case: tuple[str, bytes, str]) -> None:
    """A form post aiohttp cannot decode gets a 400 page naming the problem, before sign-in and
    after, where it was a 500 internal_error (LookupError, ValueError, InvalidHeader ...)."""
    content_type, body, says = case
    headers = {"Content-Type": content_type, "Origin": console_gateway.url}
    signed = signed_in_client(console_gateway)
    for client in (httpx.Client(base_url=console_gateway.url, timeout=30), signed):
        for path in ("/console/login", "/console/logout", "/console/verify", "/console/export",
                     "/console/policies/explain"):
            resp = client.post(path, content=body, headers=headers)
            assert resp.status_code == 400, (path, resp.status_code, resp.text[:300])
            assert resp.headers["content-type"].startswith("text/html") and says in resp.text, path
    assert signed.get("/console/overview").status_code == 200
    assert "unhandled_error" not in console_gateway.log_path.read_text()
