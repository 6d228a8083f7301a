"""A forwarded path never carries ``;`` path parameters (probe finding F7): servers that read
``;`` as the start of path parameters (Tomcat, Jetty, Spring) would read ``..;`` as ``..`` and
``models;x`` as ``models``, a path other than the one ``forward_routes`` was checked against.
Replayed over raw sockets, so no client library normalises the path first."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.conftest import Gateway
from tests.hostile.test_upstream_paths import raw_request
from tests.provider import Provider, provider  # noqa: F401


@pytest.fixture
def gateway(make_gateway: Callable[..., Gateway], provider: Provider) -> Gateway:  # noqa: F811
    """A gateway whose upstream forwards only ``models`` (the default rules minus the rest)."""
    return make_gateway(upstreams=[{"name": "provider", "base_url": provider.url, "models": ["*"],
                                    "forward_routes": ["models"]}])


@pytest.mark.parametrize("target", [
    "/v1/models/..;/files",
    "/v1/models/..;x=1/files",
    "/v1/models/.;/x",
    "/v1/models/%2e%2e;/files",
    "/v1/models/..%3B/files",
    "/v1/models;x/gpt-4o",
    "/v1/models/gpt-4o;v=2",
])
def test_a_path_segment_with_a_semicolon_is_refused_before_the_provider(gateway: Gateway,
                                                                       provider: Provider,  # noqa: F811
                                                                       target: str) -> None:
    """``;`` in a forwarded path segment, raw or as %3B, is 400 invalid_path saying to remove it;
    the provider sees nothing."""
    status, data = raw_request(gateway, "GET", target)
    assert status == 400, data[:300]
    assert b'"invalid_path"' in data and b"Remove the ';'" in data, data[:400]
    assert provider.paths == []


def test_a_path_without_parameters_still_reaches_the_provider(gateway: Gateway,
                                                              provider: Provider) -> None:  # noqa: F811
    """The same rule's ordinary paths, and a ``;`` in the query, are forwarded as they were."""
    for target in ("/v1/models/gpt-4o", "/v1/models?after=a;b"):
        status, data = raw_request(gateway, "GET", target)
        assert status == 200, data[:300]
    assert provider.paths == ["/v1/models/gpt-4o", "/v1/models?after=a;b"]
