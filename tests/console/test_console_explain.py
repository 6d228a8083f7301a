"""``policy explain`` and the console's explain form refuse a reply whose shape they cannot read
with words, not a 500 or a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, Gateway, write_config
from tests.console.conftest import login_csrf, signed_in_client

REQUEST = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
SHAPES = {
    "a choice that is a number": ({"choices": [1]}, "choices[0] must be an object"),
    "a choice that is null": ({"choices": [None]}, "choices[0] must be an object"),
    "a message that is a number": ({"choices": [{"message": 5}]}, "choices[0].message must be an object"),
    "a message that is a list": ({"choices": [{"message": [1]}]}, "choices[0].message must be an object"),
}


@pytest.mark.parametrize("case", SHAPES.values(), ids=SHAPES.keys())
def test_the_explain_form_says_what_is_wrong_with_the_reply(console_gateway: Gateway,
                                                            case: tuple[object, str]) -> None:
    """The explain form shows the reply's problem on the page (it was a 500 internal_error)."""
    reply, says = case
    client = signed_in_client(console_gateway)
    csrf = login_csrf(client.get("/console/policies").text)
    resp = client.post("/console/policies/explain", headers={"Origin": console_gateway.url},
                       data={"csrf": csrf, "request": json.dumps(REQUEST), "reply": json.dumps(reply),
                             "tenant": "acme", "session": "s1"})
    assert resp.status_code == 200, resp.text[:300]
    assert says in resp.text
    assert "unhandled_error" not in console_gateway.log_path.read_text()


@pytest.mark.parametrize("case", SHAPES.values(), ids=SHAPES.keys())
def test_policy_explain_says_what_is_wrong_with_the_reply(tmp_path: Path, case: tuple[object, str]) -> None:
    """``sessiongate policy explain --reply`` exits 2 naming the reply file and the problem (a traceback before)."""
    reply, says = case
    (tmp_path / "request.json").write_text(json.dumps(REQUEST))
    (tmp_path / "reply.json").write_text(json.dumps(reply))
    done = subprocess.run([sys.executable, "-m", "gateway", "--config",
                           str(write_config(tmp_path, None, REPO / "policies")), "policy", "explain",
                           "--request", str(tmp_path / "request.json"), "--reply", str(tmp_path / "reply.json"),
                           "--tenant", "acme", "--session", "s1"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-1000:]
    assert says in done.stderr and "reply.json" in done.stderr
