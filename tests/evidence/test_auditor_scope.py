"""Auditors by tenant (issue 10 §8): an auditor token scoped to tenants gets 403 in OpenAI's
shape for any other tenant on every admin route; an unscoped token still reads every tenant."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import httpx
import pytest

from gateway.auth import Principal
from gateway.errors import Forbidden
from gateway.settings import AuditorSettings
from tests.conftest import ACME_KEY, AUDITOR_TOKEN, GLOBEX_KEY, Gateway

SCOPED = "sg-test-acme-auditor"


def _auditors() -> list[dict[str, object]]:
    return [{"name": "demo-auditor", "token_sha256": hashlib.sha256(AUDITOR_TOKEN.encode()).hexdigest()},
            {"name": "acme-auditor", "token_sha256": hashlib.sha256(SCOPED.encode()).hexdigest(),
             "tenants": ["acme"]}]


@pytest.fixture
def scoped_gateway(make_gateway: Callable[..., Gateway]) -> Gateway:
    gw = make_gateway(auditors=_auditors())
    for key, session in ((ACME_KEY, "alice"), (GLOBEX_KEY, "globex:bob")):
        gw.openai(key=key, session=session).chat.completions.create(
            model="standin", messages=[{"role": "user", "content": "hi"}])
    return gw


def _get(gw: Gateway, route: str, token: str) -> httpx.Response:
    return httpx.get(f"{gw.url}{route}", headers={"Authorization": f"Bearer {token}"}, timeout=30)


@pytest.mark.parametrize("route", ["/admin/export?tenant={t}&format=jsonl", "/admin/audit/verify?tenant={t}"])
def test_a_scoped_auditor_reads_its_tenant_and_is_refused_the_others(scoped_gateway: Gateway, route: str) -> None:
    """The acme-scoped token reads acme and gets 403 permission_error for globex on every admin route."""
    assert _get(scoped_gateway, route.format(t="acme"), SCOPED).status_code == 200
    refused = _get(scoped_gateway, route.format(t="globex"), SCOPED)
    assert refused.status_code == 403
    assert refused.json()["error"]["type"] == "permission_error"
    assert refused.json()["error"]["code"] == "forbidden"
    assert _get(scoped_gateway, route.format(t="unknown"), SCOPED).status_code == 403


@pytest.mark.parametrize("route", ["/admin/export?tenant={t}&format=jsonl", "/admin/audit/verify?tenant={t}"])
def test_an_unscoped_auditor_still_reads_every_tenant(scoped_gateway: Gateway, route: str) -> None:
    """Backward compatible: a token with no ``tenants`` reads acme and globex alike."""
    for tenant in ("acme", "globex"):
        assert _get(scoped_gateway, route.format(t=tenant), AUDITOR_TOKEN).status_code == 200


def test_the_scope_check_lives_on_the_principal() -> None:
    """``Principal.can_read`` is the one rule: clients their own tenant, auditors their scope."""
    scoped = Principal("a", None, "auditor", frozenset({"acme"}))
    assert scoped.can_read("acme") and not scoped.can_read("globex")
    assert Principal("b", None, "auditor").can_read("globex")
    assert not Principal("c", "acme", "client").can_read("globex")
    with pytest.raises(Forbidden):
        scoped.check_tenant("globex")


def test_scope_tenants_are_validated() -> None:
    """A scope entry that is not a tenant name is a configuration error."""
    with pytest.raises(ValueError):
        AuditorSettings(name="x", token_sha256="0" * 64, tenants=["bad tenant!"])
