"""A JSON5 session document with a number too long to read is refused as the client's error
(400 ``invalid_json``, "a number too long to read"), hexadecimal as decimal, never a 500."""

from __future__ import annotations

import httpx
import pytest

from gateway.errors import InvalidJSON
from gateway.session.lenient_json import JSON5Error, loads_json5, parse_session_document
from tests.conftest import ACME_KEY, Gateway

LONG_HEX = "0x" + "f" * 4000
DOCUMENTS = [
    "{memo:" + LONG_HEX + "}",
    "{memo:-" + LONG_HEX + "}",
    "{memo:{a:[1, " + LONG_HEX + "]}}",
    "{session_settings:{max_length:0x" + "F" * 4000 + "}}",
    "{memo:" + "9" * 5000 + "}",
]


@pytest.mark.parametrize("text", DOCUMENTS)
def test_a_number_too_long_is_refused_as_json5_error(text: str) -> None:
    """Reading a document with a number longer than Python converts raises JSON5Error."""
    with pytest.raises(JSON5Error, match="a number too long to read"):
        loads_json5(text)


@pytest.mark.parametrize("text", DOCUMENTS)
def test_a_number_too_long_is_invalid_json(text: str) -> None:
    """A session import body with such a number is InvalidJSON (400)."""
    with pytest.raises(InvalidJSON, match="a number too long to read"):
        parse_session_document(text.encode())


def test_hex_numbers_that_fit_are_still_read() -> None:
    """Ordinary JSON5 hexadecimal numbers keep their values."""
    assert loads_json5("{a:0x1F, b:-0xff, c:[0X10]}") == {"a": 31, "b": -255, "c": [16]}


def test_import_with_a_long_hex_number_is_a_400(gateway: Gateway) -> None:
    """Over HTTP, the import is refused 400 invalid_json, not a 500."""
    with httpx.Client(base_url=gateway.base_url, headers={"Authorization": f"Bearer {ACME_KEY}"}) as client:
        resp = client.put("/sessions/acme:hex", content=DOCUMENTS[0].encode())
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["code"] == "invalid_json"
    assert "a number too long to read" in resp.json()["error"]["message"]
