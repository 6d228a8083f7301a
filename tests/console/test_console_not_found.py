"""A console route with an id that names nothing answers with the console's own 404 page saying
what does not exist (it was the gateway's JSON 'this path is not a sessiongate route')."""

from __future__ import annotations

import pytest

from tests.conftest import Gateway
from tests.console.conftest import signed_in_client

CASES = {
    "a job": ("/console/jobs/nonexist", "No such job"),
    "a job's bundle": ("/console/jobs/nonexist/download", "No such job"),
    "an audit entry": ("/console/audit/acme/req-unknown", "No such audit entry"),
    "a tenant's audit entry": ("/console/audit/not%20a%20tenant/req-1", "No such tenant"),
    "a tenant's session": ("/console/sessions/not%20a%20tenant/s1", "No such tenant"),
    "a session id": ("/console/sessions/acme/%20bad%20id", "No such session"),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_an_unknown_id_gets_the_consoles_404_page(console_gateway: Gateway, case: tuple[str, str]) -> None:
    """The page is the console's HTML, names what is missing, and is not the gateway's route 404."""
    path, title = case
    resp = signed_in_client(console_gateway).get(path)
    assert resp.status_code == 404
    assert resp.headers["content-type"].startswith("text/html"), resp.text[:200]
    assert title in resp.text and "not a sessiongate route" not in resp.text


def test_a_job_without_a_bundle_says_so(console_gateway: Gateway) -> None:
    """A verification job's download names that it has no bundle."""
    from tests.console.conftest import login_csrf

    client = signed_in_client(console_gateway)
    csrf = login_csrf(client.get("/console/overview").text)
    resp = client.post("/console/verify", data={"csrf": csrf, "tenant": "acme"},
                       headers={"Origin": console_gateway.url})
    assert resp.status_code == 303, resp.text
    job = resp.headers["location"]
    download = client.get(f"{job}/download")
    assert download.status_code == 404 and "No bundle to download" in download.text
