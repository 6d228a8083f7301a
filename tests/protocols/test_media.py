"""Images in recorded history: kept (and injected back), placeholdered (the default) or dropped,
as the policy's ``session.media`` says; never silently lost."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Gateway, Upstream
from tests.protocols.conftest import anthropic_client, session_setting
from tests.protocols.upstream import ProtocolUpstream

PNG = b"\x89PNG\r\n\x1a\n" + b"CANARY-PIXELS-5521" * 20
DATA_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()
IMAGE_MESSAGE = {"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                              {"type": "image_url", "image_url": {"url": DATA_URL}}]}
PLACEHOLDER = f"[image: image/png, {len(PNG)} bytes, sha256 {hashlib.sha256(PNG).hexdigest()}]"


def _gateway(make_gateway: Any, tmp_path: Path, media: str | None) -> Gateway:
    if media is None:
        return make_gateway()  # type: ignore[no-any-return]
    return make_gateway(session_setting(tmp_path, f"media: {media}"))  # type: ignore[no-any-return]


@pytest.mark.parametrize(("media", "recorded"), [
    (None, [{"type": "text", "text": "what is this?"}, {"type": "text", "text": PLACEHOLDER}]),
    ("{parts: keep}", IMAGE_MESSAGE["content"]),
    ("{parts: drop}", [{"type": "text", "text": "what is this?"}]),
])
def test_image_part_in_recorded_history(make_gateway: Any, upstream: Upstream, tmp_path: Path,
                                        media: str | None, recorded: list[dict[str, Any]]) -> None:
    """An image is recorded as itself (keep), as a placeholder naming type, size and hash (default),
    or not at all (drop); the next turn's injected window carries what was recorded."""
    gw = _gateway(make_gateway, tmp_path, media)
    client = gw.openai(session="img")
    client.chat.completions.create(model="m", messages=[IMAGE_MESSAGE])  # type: ignore[list-item]
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": "and now?"}])
    full = gw.openai().get("/sessions/img", cast_to=object)["full_context"]
    assert full[0] == {"role": "user", "content": recorded}
    injected = upstream.requests[1]["messages"][0]
    if media == "{parts: keep}":
        assert injected == IMAGE_MESSAGE
    else:
        assert injected == {"role": "user", "content": "\n\n".join(p["text"] for p in recorded)}
        assert b"CANARY-PIXELS-5521" not in gw.stored_bytes()
        assert base64.b64encode(PNG)[:40] not in gw.stored_bytes()


def test_kept_image_over_the_size_limit_is_a_placeholder(make_gateway: Any, upstream: Upstream,
                                                         tmp_path: Path) -> None:
    """media.max_bytes caps what keep keeps: a larger part is recorded as its placeholder."""
    gw = _gateway(make_gateway, tmp_path, "{parts: keep, max_bytes: 100}")
    gw.openai(session="big").chat.completions.create(model="m", messages=[IMAGE_MESSAGE])  # type: ignore[list-item]
    full = gw.openai().get("/sessions/big", cast_to=object)["full_context"]
    assert full[0]["content"][1] == {"type": "text", "text": PLACEHOLDER}


def test_anthropic_image_block_is_placeholdered(pgw: Gateway, proto: ProtocolUpstream) -> None:
    """An Anthropic base64 image block is recorded as the same placeholder by default."""
    client = anthropic_client(pgw, session="img-msg")
    client.messages.create(model="c", max_tokens=20, messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": base64.b64encode(PNG).decode()}},
        {"type": "text", "text": "describe"}]}])
    full = pgw.openai().get("/sessions/img-msg", cast_to=object)["full_context"]
    assert full[0]["content"] == [{"type": "text", "text": PLACEHOLDER}, {"type": "text", "text": "describe"}]
    assert b"CANARY-PIXELS-5521" not in pgw.stored_bytes()


def _keep(tmp_path: Path) -> Path:
    return session_setting(tmp_path, "media: {parts: keep}", name="keep")


PDF = base64.b64encode(b"%PDF-1.4 CANARY-DOC-6061").decode()


def test_a_kept_anthropic_document_goes_back_as_the_same_block(make_pgw: Any, proto: ProtocolUpstream,
                                                               tmp_path: Path) -> None:
    """Under ``media: keep`` a document block (source, title, context, citations) is injected back
    in the next round's window as it was sent; it was sent back as a neutral ``file`` part, which
    the Messages API refuses."""
    gw = make_pgw(policies=_keep(tmp_path))
    document = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": PDF},
                "title": "contract.pdf", "context": "signed copy", "citations": {"enabled": True}}
    client = anthropic_client(gw, session="doc-keep")
    client.messages.create(model="c", max_tokens=20, messages=[
        {"role": "user", "content": [document, {"type": "text", "text": "summarise"}]}])
    client.messages.create(model="c", max_tokens=20, messages=[{"role": "user", "content": "and the date?"}])
    first = proto.bodies("/v1/messages")[-1]["messages"][0]
    assert first == {"role": "user", "content": [document, {"type": "text", "text": "summarise"}]}


def test_a_chat_file_continued_on_messages_is_a_document_block(make_gateway: Any, proto: ProtocolUpstream,
                                                               tmp_path: Path) -> None:
    """A Chat ``file`` part with a ``data:`` URL, kept, becomes a base64 ``document`` block when the
    session continues on the Messages route; a ``file_id`` (another provider's, sent where the
    operator forwards ``files``) becomes its placeholder text."""
    gw = make_gateway(policies=_keep(tmp_path), upstreams=[
        {"name": "oa", "base_url": f"{proto.url}/v1", "models": ["*"], "protocol": "openai",
         "forward_routes": ["models", "files"]},
        {"name": "an", "base_url": f"{proto.url}/v1", "models": ["*"], "protocol": "anthropic"}])
    parts = [{"type": "text", "text": "read these"},
             {"type": "file", "file": {"file_data": f"data:application/pdf;base64,{PDF}", "filename": "a.pdf"}},
             {"type": "file", "file": {"file_id": "file-abc123"}}]
    gw.openai(session="doc-cross").chat.completions.create(
        model="m", messages=[{"role": "user", "content": parts}])  # type: ignore[list-item]
    anthropic_client(gw, session="doc-cross").messages.create(
        model="c", max_tokens=20, messages=[{"role": "user", "content": "and?"}])
    first = proto.bodies("/v1/messages")[-1]["messages"][0]["content"]
    assert first[0] == {"type": "text", "text": "read these"}
    assert first[1] == {"type": "document", "title": "a.pdf",
                        "source": {"type": "base64", "media_type": "application/pdf", "data": PDF}}
    assert first[2]["type"] == "text" and first[2]["text"].startswith("[file: 11 bytes of reference, sha256 ")
