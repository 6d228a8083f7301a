"""Model requests that name account-wide provider objects by id (files, vector stores,
containers, conversations) are held to the same ``forward_routes`` rule as those objects' own
routes (probe finding F2): refused with 403 ``reference_not_allowed``, naming the field and the
entry that would allow it, never the id; forwarded once the operator lists the family."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.conftest import ACME_KEY, Gateway
from tests.protocols.upstream import ProtocolUpstream

SECRET_ID = "file-OTHERTENANT0123"

RESPONSES = [
    ({"input": [{"role": "user", "content": [{"type": "input_text", "text": "read"},
                                             {"type": "input_file", "file_id": SECRET_ID}]}]},
     "input[0].content[1].file_id", "files"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": SECRET_ID}]}]},
     "input[0].content[0].file_id", "files"),
    ({"input": [{"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1",
                 "output": [{"type": "input_file", "file_id": SECRET_ID}]}]},
     "input[1].output[0].file_id", "files"),
    ({"input": "q", "tools": [{"type": "file_search", "vector_store_ids": [SECRET_ID]}]},
     "tools[0].vector_store_ids", "vector_stores"),
    ({"input": "q", "tools": [{"type": "code_interpreter", "container": SECRET_ID}]},
     "tools[0].container", "containers"),
    ({"input": "q", "tools": [{"type": "code_interpreter", "container": {"type": "auto", "file_ids": [SECRET_ID]}}]},
     "tools[0].container.file_ids", "files"),
    ({"prompt": {"id": "pmpt_1", "variables": {"doc": {"type": "input_file", "file_id": SECRET_ID}}}},
     "prompt.variables.file_id", "files"),
    ({"input": [{"type": "item_reference", "id": SECRET_ID}]}, "input[0].id", "responses"),
]
MESSAGES = [
    ({"messages": [{"role": "user", "content": [
        {"type": "document", "source": {"type": "file", "file_id": SECRET_ID}},
        {"type": "text", "text": "summarise"}]}]}, "messages[0].content[0].source.file_id", "files"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "file", "file_id": SECRET_ID}}]}]},
     "messages[0].content[0].source.file_id", "files"),
    ({"messages": [{"role": "user", "content": "hi"}], "container": SECRET_ID}, "container", "containers"),
    ({"messages": [{"role": "user", "content": "hi"}],
      "container": {"skills": [{"type": "custom", "skill_id": SECRET_ID, "version": "latest"}]}},
     "container.skills[0].skill_id", "skills"),
]


def _gateway(make_gateway: Callable[..., Gateway], proto: ProtocolUpstream, routes: list[str], **kw: Any) -> Gateway:
    return make_gateway(name=("refs-" + "-".join(routes) + "-".join(kw)).replace("/", "_"), upstreams=[
        {"name": "oa", "base_url": f"{proto.url}/v1", "models": ["*"], "forward_routes": routes, **kw},
        {"name": "an", "base_url": f"{proto.url}/v1", "models": ["*"], "protocol": "anthropic",
         "forward_routes": routes}])


def _post(gw: Gateway, path: str, body: dict[str, Any]) -> httpx.Response:
    headers = {"Authorization": f"Bearer {ACME_KEY}"}
    if path.startswith("/messages"):
        headers["anthropic-version"] = "2023-06-01"
        body = {"max_tokens": 16, **body}
    return httpx.post(gw.base_url + path, json={"model": "m", **body}, headers=headers)


def _refused(r: httpx.Response, field: str, family: str, upstream: str) -> None:
    assert r.status_code == 403, r.text
    assert SECRET_ID not in r.text
    error = r.json()["error"]
    assert error["code"] == "reference_not_allowed" if "code" in error else error["type"] == "permission_error"
    assert f"'{field}'" in error["message"], error["message"]
    assert f"adding '{family}' to forward_routes of upstream '{upstream}'" in error["message"]


@pytest.mark.parametrize(("body", "field", "family"), RESPONSES)
def test_a_responses_reference_is_refused_until_its_family_is_forwarded(
        make_gateway: Callable[..., Gateway], proto: ProtocolUpstream, body: dict[str, Any], field: str,
        family: str) -> None:
    """Under the default forward_routes the reference is 403 before the provider; with its
    family listed the same request goes through."""
    closed = _gateway(make_gateway, proto, ["models"])
    _refused(_post(closed, "/responses", body), field, family, "oa")
    assert proto.bodies("/v1/responses") == []
    open_ = _gateway(make_gateway, proto, ["models", family])
    r = _post(open_, "/responses", body)
    assert r.status_code == 200, r.text
    assert len(proto.bodies("/v1/responses")) == 1


def test_a_chat_file_part_by_id_is_refused_until_files_are_forwarded(make_gateway: Callable[..., Gateway],
                                                                     proto: ProtocolUpstream) -> None:
    """A Chat ``file`` part naming a file by ``file_id`` follows the ``files`` rule; one carrying
    its data does not name anything."""
    ref = {"messages": [{"role": "user", "content": [{"type": "text", "text": "read"},
                                                     {"type": "file", "file": {"file_id": SECRET_ID}}]}]}
    inline = {"messages": [{"role": "user", "content": [
        {"type": "file", "file": {"filename": "a.txt", "file_data": "data:text/plain;base64,aGk="}}]}]}
    closed = _gateway(make_gateway, proto, ["models"])
    _refused(_post(closed, "/chat/completions", ref), "messages[0].content[1].file.file_id", "files", "oa")
    assert proto.bodies("/v1/chat/completions") == []
    assert _post(closed, "/chat/completions", inline).status_code == 200
    assert _post(_gateway(make_gateway, proto, ["files"]), "/chat/completions", ref).status_code == 200


@pytest.mark.parametrize(("body", "field", "family"), MESSAGES)
def test_a_messages_reference_is_refused_until_its_family_is_forwarded(
        make_gateway: Callable[..., Gateway], proto: ProtocolUpstream, body: dict[str, Any], field: str,
        family: str) -> None:
    """Anthropic file sources, containers and custom skills: 403 in Anthropic's error shape
    until the anthropic upstream forwards their family."""
    closed = _gateway(make_gateway, proto, ["models"])
    r = _post(closed, "/messages", body)
    _refused(r, field, family, "an")
    assert r.json()["type"] == "error"  # Anthropic's shape
    assert proto.bodies("/v1/messages") == []
    assert _post(_gateway(make_gateway, proto, ["models", family]), "/messages", body).status_code == 200


def test_a_forwarded_count_tokens_body_is_held_to_the_same_rule(make_gateway: Callable[..., Gateway],
                                                                proto: ProtocolUpstream) -> None:
    """``messages/count_tokens`` is forwarded by default, but not with a file named by id in it."""
    gw = _gateway(make_gateway, proto, ["models", "messages/count_tokens"])
    r = _post(gw, "/messages/count_tokens", MESSAGES[0][0])
    _refused(r, "messages[0].content[0].source.file_id", "files", "an")


def test_a_conversation_is_a_reference_under_provider_held_state(make_gateway: Callable[..., Gateway],
                                                                 proto: ProtocolUpstream) -> None:
    """A provider-held ``conversation`` (an account-wide object like a file) needs
    ``conversations`` in forward_routes; a prompt template's id is operator configuration and
    goes through."""
    gw = _gateway(make_gateway, proto, ["models"], responses_state="provider")
    _refused(_post(gw, "/responses", {"input": "hi", "conversation": SECRET_ID}), "conversation", "conversations",
             "oa")
    r = _post(gw, "/responses", {"prompt": {"id": "pmpt_operator", "variables": {"city": "Paris"}}})
    assert r.status_code == 200, r.text
    assert proto.bodies("/v1/responses")[-1]["prompt"]["id"] == "pmpt_operator"
