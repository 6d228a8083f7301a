"""Configuration: validated once at start-up, errors name the file, line and field."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.errors import ConfigError
from gateway.settings import Settings, load_settings, parse_settings

REPO = Path(__file__).resolve().parent.parent


def test_example_config_is_valid() -> None:
    """The example configuration loads and has the demo clients."""
    settings = load_settings(REPO / "config/sessiongate.yaml")
    assert {c.tenant for c in settings.clients} == {"acme", "globex"}
    assert settings.upstreams == []


def test_unknown_field_names_file_line_and_field() -> None:
    """An unknown field is refused with the file, its line and the field path."""
    text = "server:\n  host: 127.0.0.1\n  prot: 80\n"
    with pytest.raises(ConfigError) as err:
        parse_settings(text, "conf.yaml")
    assert str(err.value) == ("conf.yaml:3:9: server.prot: unknown field 'prot'; did you mean 'port'? (allowed: "
                              "host, port, max_body_bytes, header_timeout, body_idle_timeout, body_timeout, "
                              "body_min_rate, body_rate_grace, keepalive_timeout, max_connections, "
                              "shutdown_timeout)")
    assert (err.value.line, err.value.field) == (3, "server.prot")


def test_wrong_type_in_list_item_names_its_line() -> None:
    """A bad value inside a list item points at that item's line."""
    text = "upstreams:\n  - name: a\n    base_url: ftp://x\n"
    with pytest.raises(ConfigError, match=r"^conf.yaml:3:15: upstreams\[0\].base_url: must start with http://") as err:
        parse_settings(text, "conf.yaml")
    assert err.value.line == 3


def test_every_finding_is_listed_each_on_its_line() -> None:
    """Not only the first: a repeated key (YAML would keep the last silently), an unknown
    top-level section with the allowed ones, and each wrong value, in the order of the file."""
    text = ("listen:\n  port: 80\nserver:\n  port: x\nstore:\n  backend: sqlit\n"
            "clients: []\nclients:\n  - name: c\n")
    with pytest.raises(ConfigError) as err:
        parse_settings(text, "conf.yaml")
    lines = str(err.value).splitlines()
    assert lines[0] == ("conf.yaml:1:1: listen: unknown field 'listen' (allowed: server, upstreams, clients, "
                        "auditors, store, keys, policies, audit, logging, tracing, console, metrics)")
    assert lines[1].startswith("conf.yaml:4:9: server.port: Input should be a valid integer")
    assert lines[2] == "conf.yaml:6:12: store.backend: Input should be 'sqlite' or 'postgres'"
    assert lines[3:] == ["conf.yaml:8:1: clients: duplicate key 'clients'",
                         "conf.yaml:9:5: clients[0].tenant: required field 'tenant' is missing"]
    assert (err.value.line, err.value.field) == (1, "listen")


def test_an_aliased_setting_is_known_by_the_name_the_file_uses() -> None:
    """``store.schema`` (``schema_name`` in the code) is listed and suggested as ``schema``."""
    with pytest.raises(ConfigError, match=r"did you mean 'schema'\? \(allowed: backend, path, dsn, dsn_env, schema,"):
        parse_settings("store:\n  schem: x\n", "conf.yaml")


def test_bad_yaml_names_the_line() -> None:
    """A YAML syntax error names the line the parser stopped at."""
    with pytest.raises(ConfigError, match=r"^conf.yaml:2:"):
        parse_settings("server:\n  host: a: b\n", "conf.yaml")


def test_client_key_hash_must_be_hex() -> None:
    """A client key given as plaintext instead of its SHA-256 is refused with the fix named."""
    text = "clients:\n  - name: c\n    tenant: acme\n    key_sha256: sg-plaintext-key\n"
    with pytest.raises(ConfigError, match="sessiongate clients new"):
        parse_settings(text, "conf.yaml")


def test_serve_with_invalid_config_exits_with_one_line_error(tmp_path: Path) -> None:
    """`serve` on a broken file prints one line naming file, line and field, and no traceback."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("server:\n  port: not-a-port\n")
    proc = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert re.search(r"bad.yaml:2:9: server.port: Input should be a valid integer", proc.stderr)
    assert "Traceback" not in proc.stderr


def test_every_setting_is_documented_in_the_readme() -> None:
    """Every configuration field appears in the README's configuration reference."""
    readme = (REPO / "README.md").read_text()
    reference = readme.split("## Configuration reference", 1)[1]

    def fields(model: type, prefix: str = "") -> list[str]:
        out = []
        for name, info in model.model_fields.items():
            if name == "source":
                continue
            key = info.alias or name
            out.append(prefix + key)
            ann = info.annotation
            is_list = getattr(ann, "__origin__", None) is list
            for t in getattr(ann, "__args__", (ann,)):
                if isinstance(t, type) and hasattr(t, "model_fields"):
                    out.extend(fields(t, f"{prefix}{key}{'[]' if is_list else ''}."))
        return out

    missing = [f for f in fields(Settings) if f"`{f}`" not in reference]
    assert not missing, f"undocumented settings: {missing}"


def test_body_rate_floor_defaults_and_bounds() -> None:
    """``server.body_min_rate`` defaults to Apache's 500 bytes/s after a 20 s grace; 0 turns it off, a negative
    rate or a grace of 0 is refused with the field named."""
    server = parse_settings("server:\n  port: 80\n", "conf.yaml").server
    assert (server.body_min_rate, server.body_rate_grace) == (500, 20.0)
    assert parse_settings("server:\n  body_min_rate: 0\n", "conf.yaml").server.body_min_rate == 0
    for text, field in (("server:\n  body_min_rate: -1\n", "server.body_min_rate"),
                        ("server:\n  body_rate_grace: 0\n", "server.body_rate_grace")):
        with pytest.raises(ConfigError) as err:
            parse_settings(text, "conf.yaml")
        assert field in str(err.value)


DUPLICATE_KEY = ("clients:\n"
                 "  - name: acme-app\n"
                 "    tenant: acme\n"
                 "    key_sha256: " + "ab" * 32 + "\n"
                 "  - name: globex-app\n"
                 "    tenant: globex\n"
                 "    key_sha256: " + "ab" * 32 + "\n")


def test_a_client_key_listed_under_two_tenants_is_refused() -> None:
    """The same key hash under two tenants would record one tenant's traffic under the other's:
    the error names the file, the line and the field of the second entry, and the first."""
    with pytest.raises(ConfigError) as caught:
        parse_settings(DUPLICATE_KEY, "conf.yaml")
    assert str(caught.value).startswith("conf.yaml:7:17: clients[1].key_sha256: same key as clients[0] "
                                        "(tenant 'acme'), listed here for tenant 'globex'")


def test_a_client_of_the_gateways_own_tenant_is_refused() -> None:
    """``_system`` holds the gateway's own audit entries (policy reloads, key rotations); a client
    given it would write its rounds into that chain, hidden from the console's tenant lists. The
    error names the file, line and field."""
    text = "clients:\n  - name: sneaky\n    tenant: _system\n    key_sha256: " + "ab" * 32 + "\n"
    with pytest.raises(ConfigError) as caught:
        parse_settings(text, "conf.yaml")
    assert str(caught.value).startswith("conf.yaml:3:13: clients[0].tenant: tenant '_system' is the gateway's own")


def test_a_key_env_client_or_auditor_token_clashing_with_a_key_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client whose key_env holds another client's key, and an auditor token equal to a client
    key, are refused the same way, each finding on its line."""
    import hashlib

    monkeypatch.setenv("SG_TEST_CLIENT_KEY", "sg-shared")
    digest = hashlib.sha256(b"sg-shared").hexdigest()
    text = ("clients:\n"
            f"  - {{name: a, tenant: acme, key_sha256: {digest}}}\n"
            "  - {name: b, tenant: globex, key_env: SG_TEST_CLIENT_KEY}\n"
            "auditors:\n"
            f"  - {{name: audit, token_sha256: {digest}}}\n")
    with pytest.raises(ConfigError) as caught:
        parse_settings(text, "conf.yaml")
    message = str(caught.value)
    assert "conf.yaml:3:" in message and "clients[1].key_env: same key as clients[0]" in message
    assert "conf.yaml:5:" in message and "auditors[0].token_sha256: same key as clients[0]" in message


def test_serve_refuses_a_client_key_listed_twice(tmp_path: Path) -> None:
    """`serve` stops at start-up with the one-line error and no traceback."""
    config = tmp_path / "dup.yaml"
    config.write_text(DUPLICATE_KEY)
    proc = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "dup.yaml:7:17: clients[1].key_sha256: same key as clients[0]" in proc.stderr


@pytest.mark.parametrize(("text", "message"), [
    ("server:\n  port: true\n", "conf.yaml:2:9: server.port: Input should be a valid integer, got a boolean"),
    ("server:\n  port: \"8787\"\n", "conf.yaml:2:9: server.port: Input should be a valid integer, got a string"),
    ("server:\n  port: 8787.0\n", "conf.yaml:2:9: server.port: Input should be a valid integer, got a number"),
    ("server:\n  header_timeout: .inf\n", "conf.yaml:2:19: server.header_timeout: Input should be a finite number"),
    ("audit:\n  checkpoint_seconds: \"60\"\n", "conf.yaml:2:23: audit.checkpoint_seconds: Input should be a valid "
                                               "number, got a string"),
    ("logging:\n  level: 5\n", "conf.yaml:2:10: logging.level: Input should be 'debug', 'info', 'warning' or "
                               "'error'"),
])
def test_settings_are_strictly_typed_as_policies_are(text: str, message: str) -> None:
    """A boolean, a quoted number or an infinite timeout is an error at its line, not coerced."""
    with pytest.raises(ConfigError) as err:
        parse_settings(text, "conf.yaml")
    assert str(err.value) == message


def test_strict_settings_still_take_whole_seconds_and_paths() -> None:
    """An integer is a valid number of seconds, and paths are written as strings."""
    settings = parse_settings("server: {header_timeout: 5}\nstore: {path: x/db.sqlite}\n", "conf.yaml")
    assert settings.server.header_timeout == 5 and settings.store.path == Path("x/db.sqlite")


def test_an_unset_environment_variable_is_named_at_its_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """dsn_env, master_key_env, a client's key_env and an upstream's api_key_env naming an unset variable
    are errors at the file, line and field of the setting."""
    for name in ("SG_T_DSN", "SG_T_MASTER", "SG_T_CLIENT", "SG_T_UP"):
        monkeypatch.delenv(name, raising=False)
    settings = parse_settings(
        "store:\n  backend: postgres\n  dsn_env: SG_T_DSN\nkeys:\n  master_key_env: SG_T_MASTER\n"
        "clients:\n  - {name: a, tenant: acme, key_sha256: '" + "0" * 64 + "'}\n"
        "  - {name: b, tenant: acme, key_env: SG_T_CLIENT}\n"
        "upstreams:\n  - name: up\n    base_url: http://127.0.0.1:9/v1\n    api_key_env: SG_T_UP\n", "conf.yaml")
    checks = [(settings.store.postgres_dsn, "conf.yaml:3:12: store.dsn_env: environment variable SG_T_DSN"),
              (settings.keys.check_env, "conf.yaml:5:19: keys.master_key_env: environment variable SG_T_MASTER"),
              (settings.clients[1].digest, "conf.yaml:8:38: clients[1].key_env: environment variable SG_T_CLIENT"),
              (settings.upstreams[0].api_key,
               "conf.yaml:12:18: upstreams[0].api_key_env: environment variable SG_T_UP")]
    for call, message in checks:
        with pytest.raises(ConfigError) as err:
            call()
        assert str(err.value) == message + " is not set"


def test_two_auditors_with_one_name_are_refused_at_the_second() -> None:
    """The audit trail and the console's per-auditor limits tell auditors apart by name: a second
    auditor of the same name let one token sign the other out."""
    text = ("auditors:\n"
            f"  - {{name: audit, token_sha256: '{'a' * 64}'}}\n"
            f"  - {{name: audit, token_sha256: '{'b' * 64}'}}\n")
    with pytest.raises(ConfigError) as caught:
        parse_settings(text, "cfg.yaml")
    assert str(caught.value).startswith("cfg.yaml:3:") and "auditors[1].name" in str(caught.value), caught.value
    assert "auditors[0]" in str(caught.value)


def test_command_line_server_values_are_validated_as_the_files_are() -> None:
    """``serve --port 70000`` is refused as ``server.port: 70000`` in the file is, naming the flag (it was merged
    unvalidated and the gateway listened on 70000 - 65536); a valid flag replaces the file's value."""
    from gateway.settings import with_server_flags

    settings = parse_settings("server: {host: 127.0.0.1, port: 8787}\n", "conf.yaml")
    for port, limit in ((70000, "less than or equal to 65535"), (84638, "less than or equal to 65535"),
                        (-1, "greater than or equal to 0")):
        with pytest.raises(ConfigError) as err:
            with_server_flags(settings, host=None, port=port)
        assert str(err.value) == f"--port {port}: Input should be {limit} (as server.port in the configuration)"
    with pytest.raises(ConfigError, match=r"^--host True: Input should be a valid string"):
        with_server_flags(settings, host=True, port=None)
    given = with_server_flags(settings, host="::1", port=19300)
    assert (given.server.host, given.server.port, given.source) == ("::1", 19300, "conf.yaml")
    assert with_server_flags(settings, host=None, port=None).server.port == 8787


def test_an_unset_variable_is_listed_with_the_files_other_findings(monkeypatch: pytest.MonkeyPatch) -> None:
    """For ``serve`` (``environment=True``) an unset variable a setting names is one more finding of the same
    report, beside an invalid value and an unknown section (it used to show only after those were fixed);
    other commands, which need no provider key, are not refused for it."""
    monkeypatch.delenv("NOPE_NOT_SET", raising=False)
    monkeypatch.delenv("NOPE_CLIENT", raising=False)
    text = ("upstreams:\n  - name: up\n    base_url: http://127.0.0.1:9/v1\n    protocol: openaii\n"
            "    api_key_env: NOPE_NOT_SET\nstore2: {}\nclients:\n  - {name: c, tenant: acme, key_env: NOPE_CLIENT}\n")
    with pytest.raises(ConfigError) as err:
        parse_settings(text, "conf.yaml", environment=True)
    assert str(err.value).splitlines() == [
        "conf.yaml:4:15: upstreams[0].protocol: Input should be 'openai' or 'anthropic'",
        "conf.yaml:5:18: upstreams[0].api_key_env: environment variable NOPE_NOT_SET is not set; export it before "
        "starting the gateway",
        "conf.yaml:6:9: store2: unknown field 'store2'; did you mean 'store'? (allowed: server, upstreams, clients, "
        "auditors, store, keys, policies, audit, logging, tracing, console, metrics)",
        "conf.yaml:8:38: clients[0].key_env: environment variable NOPE_CLIENT is not set; export it before starting "
        "the gateway"]
    with pytest.raises(ConfigError) as err:
        parse_settings(text, "conf.yaml")
    assert "NOPE" not in str(err.value)
    valid = text.replace("openaii", "openai").replace("store2: {}\n", "")
    monkeypatch.setenv("NOPE_CLIENT", "sg-test")
    with pytest.raises(ConfigError) as err:
        parse_settings(valid, "conf.yaml", environment=True)
    assert str(err.value) == ("conf.yaml:5:18: upstreams[0].api_key_env: environment variable NOPE_NOT_SET is not "
                              "set; export it before starting the gateway")
    assert parse_settings(valid, "conf.yaml").upstreams[0].api_key_env == "NOPE_NOT_SET"


def test_the_readme_names_the_database_file_the_store_writes() -> None:
    """Every SQLite file the README names is the one ``store.path`` makes (the erasure section said
    ``gateway.db``)."""
    from gateway.settings import StoreSettings

    readme = (REPO / "README.md").read_text()
    names = set(re.findall(r"([\w.-]+\.db)\b", readme))
    assert names == {StoreSettings().path.name}, names
