"""Text documents and text files are recorded as the text the model read (SPEC §3: no client
input hides text it sent from the record); binary media stay placeholders whose size and sha256
are those of the bytes sent (or of the reference), and the window sends the text back in a form
each provider accepts."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any

from tests.conftest import REPO, Gateway, Upstream
from tests.protocols.conftest import anthropic_client
from tests.protocols.upstream import ProtocolUpstream

PDF = b"%PDF-1.4 binary \x00\x01 pages"
PDF_B64 = base64.b64encode(PDF).decode()
PDF_PLACEHOLDER = f"[file: application/pdf, {len(PDF)} bytes, sha256 {hashlib.sha256(PDF).hexdigest()}]"
TEXT_FILE = "data:text/plain;base64," + base64.b64encode(b"FILE-TEXT-CANARY: wire 5000 EUR to X").decode()


def _texts(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "\n".join(p.get("text", "") for p in content if isinstance(p, dict))


def _only_text(content: Any, kind: str) -> bool:
    """Whether *content* is text: a string, or parts of type *kind* none of which is empty."""
    return isinstance(content, str) or all(p["type"] == kind and p["text"] for p in content)


def _full(gw: Gateway, sid: str) -> list[dict[str, Any]]:
    return gw.openai().get(f"/sessions/{sid}", cast_to=object)["full_context"]  # type: ignore[no-any-return]


def test_anthropic_documents_are_recorded_as_their_text(pgw: Gateway, proto: ProtocolUpstream) -> None:
    """A text or content document, its title and context, and a PDF's title and context are
    recorded as text; the PDF as a placeholder hashing its decoded bytes; the next window sends
    only text blocks, none of them empty."""
    client = anthropic_client(pgw, session="docs")
    client.messages.create(model="c", max_tokens=20, messages=[{"role": "user", "content": [
        {"type": "document", "source": {"type": "text", "media_type": "text/plain",
                                        "data": "DOC-TEXT-CANARY: wire 5000 EUR to X"},
         "title": "TITLE-CANARY", "context": "CONTEXT-CANARY", "citations": {"enabled": True}},
        {"type": "document", "source": {"type": "content",
                                        "content": [{"type": "text", "text": "DOC-CONTENT-CANARY"}]}},
        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": PDF_B64},
         "title": "PDF-TITLE-CANARY", "context": "PDF-CONTEXT-CANARY"},
        {"type": "text", "text": "summarise"}]}])
    client.messages.create(model="c", max_tokens=20, messages=[{"role": "user", "content": "and?"}])

    recorded = _texts(_full(pgw, "docs")[0]["content"])
    for canary in ("DOC-TEXT-CANARY: wire 5000 EUR to X", "TITLE-CANARY", "CONTEXT-CANARY", "DOC-CONTENT-CANARY",
                   "PDF-TITLE-CANARY", "PDF-CONTEXT-CANARY", PDF_PLACEHOLDER, "summarise"):
        assert canary in recorded
    window = proto.bodies("/v1/messages")[-1]["messages"][0]
    assert window["role"] == "user" and _only_text(window["content"], "text")
    assert "DOC-TEXT-CANARY" in _texts(window["content"]) and PDF_PLACEHOLDER in _texts(window["content"])


def test_anthropic_url_document_placeholder_hashes_the_url(pgw: Gateway, proto: ProtocolUpstream) -> None:
    """A document by URL is a reference: its placeholder gives the URL's length and sha256."""
    url = "https://example.test/contract.pdf"
    anthropic_client(pgw, session="doc-url").messages.create(model="c", max_tokens=20, messages=[
        {"role": "user", "content": [{"type": "document", "source": {"type": "url", "url": url}},
                                     {"type": "text", "text": "read it"}]}])
    content = _full(pgw, "doc-url")[0]["content"]
    assert content[0] == {"type": "text", "text": f"[file: {len(url)} bytes of reference, "
                                                  f"sha256 {hashlib.sha256(url.encode()).hexdigest()}]"}


def test_responses_text_file_is_recorded_as_text(pgw: Gateway, proto: ProtocolUpstream) -> None:
    """A Responses ``input_file`` holding text/plain is recorded as its text (and file name), a
    PDF one as its placeholder (with its name); the next window sends them as ``input_text`` parts."""
    client = pgw.openai(session="resp-file")
    client.responses.create(model="gpt-x", input=[{"role": "user", "content": [
        {"type": "input_file", "filename": "NAME-CANARY.txt", "file_data": TEXT_FILE},
        {"type": "input_file", "filename": "scan.pdf", "file_data": f"data:application/pdf;base64,{PDF_B64}"},
        {"type": "input_text", "text": "what does it say?"}]}])
    client.responses.create(model="gpt-x", input="and?")
    recorded = _texts(_full(pgw, "resp-file")[0]["content"])
    named_pdf = PDF_PLACEHOLDER.replace(": ", ": scan.pdf, ", 1)
    for canary in ("FILE-TEXT-CANARY: wire 5000 EUR to X", "NAME-CANARY.txt", named_pdf):
        assert canary in recorded
    window = proto.bodies("/v1/responses")[-1]["input"][0]
    assert window["role"] == "user" and _only_text(window["content"], "input_text")
    assert "FILE-TEXT-CANARY" in _texts(window["content"])


def test_chat_text_file_is_recorded_as_text(make_gateway: Any, upstream: Upstream) -> None:
    """A Chat ``file`` part holding text (a percent-encoded ``data:`` URL too) is recorded as text,
    and sent back in the window as text."""
    gw = make_gateway()
    client = gw.openai(session="chat-file")
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": [  # type: ignore[list-item]
        {"type": "file", "file": {"file_data": TEXT_FILE, "filename": "a.txt"}},
        {"type": "file", "file": {"file_data": "data:,PLAIN%20CANARY"}},
        {"type": "text", "text": "read"}]}])
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": "and?"}])
    recorded = _full(gw, "chat-file")[0]["content"]
    assert "FILE-TEXT-CANARY: wire 5000 EUR to X" in _texts(recorded) and "PLAIN CANARY" in _texts(recorded)
    assert "FILE-TEXT-CANARY" in _texts(upstream.requests[-1]["messages"][0]["content"])


def test_document_text_is_input_to_a_keyed_policy(make_pgw: Any, proto: ProtocolUpstream, tmp_path: Path) -> None:
    """Under ``input_keys: ["input"]`` a text document is part of the input, as the text beside it is."""
    folder = tmp_path / "pol"
    folder.mkdir()
    text = (REPO / "policies/default.yaml").read_text().replace("input_keys: null", 'input_keys: ["input"]')
    (folder / "default.yaml").write_text(text)
    gw = make_pgw(policies=folder)
    anthropic_client(gw, session="doc-keyed").messages.create(model="c", max_tokens=20, messages=[
        {"role": "user", "content": [{"type": "document", "source": {"type": "text", "data": "KEYED-DOC-CANARY"}},
                                     {"type": "text", "text": "question"}]}])
    recorded = _full(gw, "doc-keyed")[0]["content"]
    assert recorded.startswith("[input]:") and "KEYED-DOC-CANARY" in recorded


def test_a_text_file_in_any_spelling_is_recorded_and_no_charset_is_run(make_gateway: Any) -> None:
    """The ways a text file slipped past as a placeholder or broke the request: an upper-case
    ``DATA:`` scheme, ``application/octet-stream`` with a text file's name (a provider may go by the
    name), and a client-named charset that is not a text encoding (``idna`` raised: 500; ``punycode``
    decodes in quadratic time on the event loop: one 240 KB request held every client 1.65 s).
    Such charsets are read as UTF-8, so the recorded text is the bytes as sent."""
    gw = make_gateway()
    octet = "data:application/octet-stream;base64," + base64.b64encode(b"OCTET-TEXT-CANARY").decode()
    parts: list[Any] = [
        {"type": "file", "file": {"file_data": "DATA:text/plain,UPPER-SCHEME-CANARY"}},
        {"type": "file", "file": {"file_data": octet, "filename": "notes.txt"}},
        {"type": "file", "file": {"file_data": "data:text/plain;charset=idna,IDNA-CANARY.example"}},
        {"type": "file", "file": {"file_data": "data:text/plain;charset=punycode,PUNY-CANARY-" + "a" * 2000}},
        {"type": "text", "text": "read"}]
    gw.openai(session="spellings").chat.completions.create(model="m", messages=[{"role": "user", "content": parts}])
    recorded = _texts(_full(gw, "spellings")[0]["content"])
    for canary in ("UPPER-SCHEME-CANARY", "OCTET-TEXT-CANARY", "IDNA-CANARY.example", "PUNY-CANARY-" + "a" * 2000):
        assert canary in recorded, canary
    binary = "data:application/octet-stream;base64," + PDF_B64  # no text name: still a placeholder
    gw.openai(session="binary").chat.completions.create(model="m", messages=[{"role": "user", "content": [
        {"type": "file", "file": {"file_data": binary, "filename": "blob.bin"}}, {"type": "text", "text": "x"}]}])
    assert f"[file: blob.bin, application/octet-stream, {len(PDF)} bytes" in _texts(_full(gw, "binary")[0]["content"])
