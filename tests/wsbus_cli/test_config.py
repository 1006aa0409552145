"""Settings from a TOML file, the environment and flags: wsbus/config.py, and the CLI using it."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import msgspec
import pytest

from wsbus import GatewayConfig, WireLimits
from wsbus.errors import ConfigError, WsbusError
from wsbus.registry import AliasPolicy
from wsbus_cli.config import all_sections, load_settings, parse_tokens, render_docs, render_toml
from wsbus_cli.supervisor import Child, free_port

DOCS = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
SCRIPT = Path(sys.executable).with_name("wsbus")
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "wsbus_cli"]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "wsbus.toml"
    path.write_text(textwrap.dedent(text))
    return path


def refused(tmp_path: Path, text: str, **kwargs: object) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text), environ={}, **kwargs)  # type: ignore[arg-type]
    return str(info.value)


# -- the docs cannot drift from the structs -------------------------------------------------


def test_docs_list_every_setting_with_its_default() -> None:
    assert DOCS.read_text(encoding="utf-8") == render_docs(), (
        "docs/configuration.md is out of date: run `wsbus config docs > docs/configuration.md`"
    )


def test_every_field_of_every_struct_is_documented_with_a_meaning() -> None:
    text = DOCS.read_text(encoding="utf-8")

    def walk(cls: type[msgspec.Struct], prefix: str) -> None:
        for info in msgspec.structs.fields(cls):
            if isinstance(info.type, type) and issubclass(info.type, msgspec.Struct):
                walk(info.type, f"{prefix}.{info.name}")
                continue
            row = next(line for line in text.splitlines() if f"| `{prefix}.{info.name}` |" in line)
            assert not row.rstrip().endswith("|  |"), f"{prefix}.{info.name} has no meaning"

    for section in all_sections():
        walk(section.load(), section.name)


# -- reading a file --------------------------------------------------------------------------


def test_a_file_sets_every_part(tmp_path: Path) -> None:
    settings = load_settings(
        write(
            tmp_path,
            """
            [serve]
            bus = "pyro"
            port = 9000
            [gateway]
            rate = 5
            alias_policy = "suffix"
            [gateway.wire]
            max_depth = 8
            [websockets]
            allowed_origins = ["https://app.example.com"]
            ping_interval = false
            [pyro]
            ns_port = 9191
            """,
        ),
        environ={},
    )
    assert settings.serve.bus == "pyro" and settings.serve.port == 9000
    assert settings.gateway.rate == 5.0 and settings.gateway.alias_policy is AliasPolicy.SUFFIX
    assert settings.gateway.wire == WireLimits(max_depth=8)
    assert settings.websockets.allowed_origins == ("https://app.example.com",)
    assert settings.websockets.ping_interval is None
    assert settings.pyro.ns_port == 9191
    # What was not set keeps the struct's default.
    assert settings.gateway.burst == GatewayConfig().burst


def test_no_file_gives_the_defaults() -> None:
    settings = load_settings(None, environ={})
    assert settings.gateway == GatewayConfig()
    assert settings.pyro is None  # a memory bus needs no Pyro settings (nor Pyro5)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[gateway]\nrtae = 5\n", ["unknown setting 'gateway.rtae'", "did you mean 'rate'"]),
        ("[gateway.wire]\nmax_frame = 1\n", ["'gateway.wire.max_frame'", "'max_frame_bytes'"]),
        ("[websockets]\norigins = []\n", ["'websockets.origins'"]),
        ("[pyro]\nns_prot = 1\n", ["'pyro.ns_prot'", "'ns_port'"]),
        ("[gatway]\nrate = 1\n", ["unknown table 'gatway'", "'gateway'"]),
        ("rate = 1\n", ["unknown setting 'rate'"]),
        ('[gateway]\nrate = "fast"\n', ["gateway.rate", '"fast"', "expected a number"]),
        ("[gateway]\nburst = 2.5\n", ["gateway.burst", "expected an integer"]),
        ('[gateway]\nalias_policy = "nope"\n', ["gateway.alias_policy", '"refuse", "suffix"']),
        ('[websockets]\nallowed_origins = "x"\n', ["allowed_origins", "a list of strings"]),
        ("[serve]\nport = 70000\n", ["serve.port 70000", "0-65535"]),
        ('[gateway]\nnode = "bad node!"\n', ["gateway.node", "'bad node!'", "A-Z a-z 0-9 _ -"]),
        ("[gateway]\noutbound_queue = 0\n", ["[gateway]", "outbound_queue", "wsbus.toml"]),
        ("[pyro]\nthreadpool_size = 1\n", ["[pyro]", "threadpool_size"]),
        ("[pyro]\nsecret = 5\n", ["pyro.secret", "<redacted>", "a string"]),
        ("[gateway\nrate = 1\n", ["not valid TOML"]),
    ],
)
def test_a_wrong_setting_is_refused_by_its_full_name(
    tmp_path: Path, text: str, expected: list[str]
) -> None:
    message = refused(tmp_path, text)
    for part in expected:
        assert part in message


def test_flags_override_the_environment_which_overrides_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[gateway]\nrate = 5.0\n[pyro]\nsecret = "from-file"\n')
    environ = {"WSBUS_SECRET": "from-env"}
    settings = load_settings(path, environ=environ)
    assert settings.gateway.rate == 5.0 and settings.pyro.secret == "from-env"
    settings = load_settings(
        path,
        environ=environ,
        flags={"gateway.rate": ("--rate", 7.0), "pyro.secret": ("--secret", "from-flag")},
    )
    assert settings.gateway.rate == 7.0 and settings.pyro.secret == "from-flag"
    assert settings.sources["gateway.rate"] == "--rate"


def test_a_flag_error_names_the_flag(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, environ={}, flags={"gateway.node": ("--node", "a.b")})
    assert str(info.value).startswith("--node 'a.b'")


def test_tokens_from_the_environment() -> None:
    assert parse_tokens("ann:t0k3n, bob:s3:cr3t") == {"ann": "t0k3n", "bob": "s3:cr3t"}
    settings = load_settings(None, environ={"WSBUS_TOKENS": "ann:t0k3n"})
    assert settings.auth.tokens == {"ann": "t0k3n"}
    with pytest.raises(ConfigError) as info:
        parse_tokens("ann:t0k3n,hunter2-without-a-user")
    assert "pair 2" in str(info.value) and "hunter2" not in str(info.value)


def test_the_effective_settings_print_as_toml_with_secrets_redacted(tmp_path: Path) -> None:
    path = write(tmp_path, '[serve]\nbus = "pyro"\n[auth.tokens]\nann = "t0k3n"\n')
    settings = load_settings(path, environ={"WSBUS_SECRET": "s3cr3t"})
    text = render_toml(settings)
    assert "s3cr3t" not in text and "t0k3n" not in text
    again = tomllib.loads(text)
    assert again["pyro"]["secret"] == "<redacted>"
    assert again["auth"]["tokens"] == {"ann": "<redacted>"}
    assert again["gateway"]["rate"] == GatewayConfig().rate
    assert again["gateway"]["wire"]["max_depth"] == WireLimits().max_depth
    # Printed settings read back as the same settings (secrets aside).
    del again["pyro"]["secret"], again["auth"]["tokens"]
    (tmp_path / "again.toml").write_text(render_toml(load_settings(path, environ={})))
    reread = load_settings(tmp_path / "again.toml", environ={})
    assert reread.gateway == settings.gateway and reread.websockets == settings.websockets


def test_an_unused_bus_costs_no_import_to_read_settings() -> None:
    # The Pyro bus's adapter object is loaded (its entry point names the [pyro] table), but
    # neither Pyro5 nor the bus's own modules are, until the table is used.
    code = (
        "import sys; from wsbus_cli.config import load_settings;"
        "s = load_settings(None, environ={});"
        "assert s.pyro is None;"
        "loaded = {m for m in sys.modules if m.startswith(('Pyro5', 'wsbus_pyro.'))};"
        "assert loaded <= {'wsbus_pyro.adapter'}, sorted(loaded)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- the command line ------------------------------------------------------------------------


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COMMAND, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
    )


def test_config_check_prints_the_effective_settings(tmp_path: Path) -> None:
    path = write(tmp_path, "[gateway]\nrate = 5.0\n[pyro]\nns_port = 9191\n")
    result = run("config", "check", str(path), env={"WSBUS_SECRET": "s3cr3t"})
    assert result.returncode == 0, result.stderr
    assert "s3cr3t" not in result.stdout
    printed = tomllib.loads(result.stdout)
    assert printed["gateway"]["rate"] == 5.0
    assert printed["pyro"]["secret"] == "<redacted>"
    assert "rate = 5.0  # from " in result.stdout


def test_config_check_refuses_a_bad_file_in_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, "[gateway]\nrtae = 5\n")
    result = run("config", "check", str(path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "gateway.rtae" in lines[0]


async def test_serve_runs_with_the_file_and_the_flags_override_it(tmp_path: Path) -> None:
    from wsbus_websockets import connect

    port = free_port()
    path = write(
        tmp_path,
        """
        [serve]
        port = 1
        services = ["wsbus_cli.demo_services:Echo"]
        [gateway]
        rate = 5.0
        burst = 7
        allow_anonymous = false
        auth_frame = false
        [gateway.wire]
        max_depth = 9
        """,
    )
    child = Child(
        ["serve", "--config", str(path), "--port", str(port), "--burst", "8"],
        ready="listening on",
        env={"WSBUS_TOKENS": "ann:t0k3n"},
    )
    try:
        async with asyncio.timeout(30):
            async with connect(f"ws://127.0.0.1:{port}/", token="t0k3n") as client:
                limits = client.welcome["limits"]
                assert (limits["rate"], limits["burst"], limits["max_depth"]) == (5.0, 8, 9)
                assert client.welcome["user"] == "ann"
                reply = await client.request("echo", "hi")
                assert reply["content"]["content"] == "hi"
            # No anonymous clients: one without a token is refused.
            with pytest.raises(WsbusError):
                async with connect(f"ws://127.0.0.1:{port}/", reconnect=False):
                    pass
    finally:
        assert child.stop() == 0, child.text


def test_the_flags_the_docs_name_are_the_flags_the_cli_has() -> None:
    # serve's own flags and the adapters' (the Pyro bus's, the WebSocket edge's), as parsed.
    from wsbus_cli.cli import build_parser, flag_settings
    from wsbus_cli.config import all_flags

    parser = build_parser()
    settings = flag_settings(parser.parse_args(["serve"])).values()
    # The flags `wsbus serve --help` lists (argparse's public help text, not its internals).
    help_text = io.StringIO()
    with contextlib.redirect_stdout(help_text), pytest.raises(SystemExit):
        parser.parse_args(["serve", "--help"])
    listed = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", help_text.getvalue()))
    flags = all_flags()
    for dotted, flag in settings:
        assert flags[dotted].split(",")[0] == flag, dotted
        assert flag in listed, (dotted, flag)
    documented = {dotted for dotted, flag in flags.items() if flag.startswith("-")}
    assert documented == {dotted for dotted, _ in settings}


def test_history_and_resume_tables_and_the_resume_secret(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[gateway.history]\ngroups = ["room.*"]\nsize = 50\n[gateway.resume]\nwindow = 90.0\n',
    )
    secret = "ab" * 32
    settings = load_settings(path, environ={"WSBUS_RESUME_SECRET": secret})
    assert settings.gateway.history.groups == ("room.*",) and settings.gateway.history.size == 50
    assert (settings.gateway.resume.window, settings.gateway.resume.secret) == (90.0, secret)
    assert settings.sources["gateway.resume.secret"] == "WSBUS_RESUME_SECRET"
    text = render_toml(settings)
    assert secret not in text
    assert tomllib.loads(text)["gateway"]["resume"]["secret"] == "<redacted>"
    assert secret not in repr(settings.gateway)
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ={"WSBUS_RESUME_SECRET": "not-hex-" + secret})
    assert "32 hex digits" in str(info.value) and secret not in str(info.value)


def test_tracing_settings_from_the_file_and_the_flags(tmp_path: Path) -> None:
    from wsbus_cli.cli import build_parser, flag_settings, settings_from_args

    path = write(tmp_path, "[gateway]\ntracing = true\n[serve]\nservice_tracing = true\n")
    settings = load_settings(path)
    assert settings.gateway.tracing is True and settings.serve.service_tracing is True
    assert load_settings(None).gateway.tracing is False
    parser = build_parser()
    for argv, gateway, services in [
        (["serve"], False, False),
        (["serve", "--tracing"], True, False),
        (["serve", "--service-tracing"], False, True),
        (["service", "m:C", "--tracing"], False, True),
    ]:
        args = parser.parse_args(argv)
        args._flags = flag_settings(args)
        settings = settings_from_args(args)
        assert (settings.gateway.tracing, settings.serve.service_tracing) == (gateway, services)
