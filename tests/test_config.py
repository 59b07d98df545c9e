"""Unit tests of dm_agent.config: converters, search path, precedence, messages."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import dm_agent
from dm_agent.cli import cli_overrides
from dm_agent.collectors.host import is_excluded
from dm_agent.config import settings as config
from dm_agent.config import values
from dm_agent.errors import ConfigError

SECRET = "s3cr3t-value-that-must-not-leak"

PACKAGE = Path(dm_agent.__file__).parent


def write(path: Path, body: str) -> str:
    path.write_text(body, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("172.31.0.12:2375", "tcp://172.31.0.12:2375"),
        ("tcp://10.0.0.1:2375", "tcp://10.0.0.1:2375"),
        ("unix:///var/run/docker.sock", "unix:///var/run/docker.sock"),
        ("https://docker.example:2376/", "https://docker.example:2376"),
        ("[::1]:2375", "tcp://[::1]:2375"),
    ],
)
def test_docker_endpoint_forms(raw: str, expected: str) -> None:
    assert values.parse_docker(raw) == expected


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ("172.31.0.12", "no port"),
        ("host:notaport", "port number"),
        ("host:70000", "port number"),
        ("ftp://host:21", "unknown scheme 'ftp'"),
        ("unix://relative/path", "unix:///absolute"),
        ("", "empty"),
    ],
)
def test_docker_endpoint_errors(raw: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        values.parse_docker(raw)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("172.31.0.3:8762", "http://172.31.0.3:8762"),
        ("http://master:8762/", "http://master:8762"),
        ("https://master.example/cluman/", "https://master.example/cluman"),
        ("", None),
    ],
)
def test_master_forms(raw: str, expected: str | None) -> None:
    assert values.parse_master(raw) == expected


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ("master", "no port"),
        ("gopher://m:70", "unknown scheme 'gopher'"),
        ("http://:8762", "host name"),
        ("http://m:99999", "bad port"),
        ("http://m:1/x?y=1", "query"),
    ],
)
def test_master_errors(raw: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        values.parse_master(raw)


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [("ten", "whole number"), ("0", "at least 1"), ("-5", "at least 1"), ("1.5", "whole number"),
     ("100000", "at most")],
)
def test_interval_errors(raw: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        values.parse_interval(raw)


def test_search_path_first_existing_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cwd = tmp_path / "cwd"
    xdg = tmp_path / "xdg"
    cwd.mkdir()
    xdg.mkdir()
    monkeypatch.chdir(cwd)
    env = {"HOME": str(tmp_path / "home"), "XDG_CONFIG_HOME": str(xdg)}
    write(xdg / "dm-agent.ini", "[main]\ntimeout = 7\n")
    settings, _ = config.load({}, None, env)
    assert settings.interval == 7
    assert settings.config_file == str(xdg / "dm-agent.ini")
    # the CWD file takes over, and only it is read: its missing timeout is the default
    write(cwd / "dm-agent.ini", "[main]\nmaster = m:1\n")
    settings, _ = config.load({}, None, env)
    assert settings.config_file == str(cwd / "dm-agent.ini")
    assert settings.interval == 60
    assert settings.master == "http://m:1"


def test_home_config_without_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    home = tmp_path / "home"
    (home / ".config").mkdir(parents=True)
    write(home / ".config" / "dm-agent.ini", "[main]\ntimeout = 9\n")
    settings, _ = config.load({}, None, {"HOME": str(home)})
    assert settings.interval == 9


def test_precedence_cli_env_file_default(tmp_path: Path) -> None:
    path = write(tmp_path / "a.ini", "[main]\ntimeout = 10\nmaster = file:1\nlog_level = 1\n")
    env = {"DM_AGENT_TIMEOUT": "20", "DM_AGENT_MASTER": "env:2"}
    settings, _ = config.load(cli_overrides(timeout="30"), path, env)
    assert settings.interval == 30
    assert settings.sources["timeout"] == "command line"
    assert settings.master == "http://env:2"
    assert settings.sources["master"] == "environment DM_AGENT_MASTER"
    assert settings.log_level == 1
    assert settings.sources["log_level"].endswith("a.ini [main] log_level")
    assert settings.docker == config.DEFAULT_DOCKER
    assert settings.sources["docker"] == "default"
    assert settings.ttl == 60


def test_invalid_file_value_names_file_key_and_expectation(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.ini", "[main]\ntimeout = soon\n")
    with pytest.raises(ConfigError) as err:
        config.load({}, path, {})
    msg = str(err.value)
    assert path in msg and "timeout" in msg and "'soon'" in msg and "whole number" in msg
    assert err.value.exit_code == 78


def test_invalid_env_value_names_variable() -> None:
    with pytest.raises(ConfigError, match="environment DM_AGENT_DOCKER: invalid docker"):
        config.load({}, os.devnull, {"DM_AGENT_DOCKER": "ftp://x:1"})


def test_unknown_key_and_section_are_warnings(tmp_path: Path) -> None:
    path = write(tmp_path / "w.ini", "[main]\nmaster = m:1\ncolour = blue\n[extra]\na = b\n")
    settings, warnings = config.load({}, path, {})
    assert settings.master == "http://m:1"
    assert any("unknown key 'colour'" in w and path in w for w in warnings)
    assert any("[extra]" in w for w in warnings)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [("not an ini file at all\n", "cannot parse"), ("[main]\nmaster\n", "cannot parse")],
)
def test_unparsable_file(tmp_path: Path, body: str, fragment: str) -> None:
    path = write(tmp_path / "x.ini", body)
    with pytest.raises(ConfigError, match=fragment):
        config.load({}, path, {})


def test_missing_and_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        config.load({}, str(tmp_path / "nope.ini"), {})
    with pytest.raises(ConfigError, match="is a directory"):
        config.load({}, str(tmp_path), {})


def test_unreadable_file_as_other_user(tmp_path: Path) -> None:
    path = write(tmp_path / "locked.ini", "[main]\n")
    os.chmod(path, 0)
    if os.geteuid() == 0:
        # root reads anything: prove the message with a real unprivileged reader instead
        import subprocess
        import sys

        os.chmod(tmp_path, 0o755)
        code = (
            "import sys; from dm_agent.config import settings as config\n"
            "try: config.load({}, sys.argv[1], {})\n"
            "except config.ConfigError as e: print(e); sys.exit(78)\n"
        )
        proc = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
             sys.executable, "-c", code, path],
            capture_output=True, text=True, cwd=PACKAGE.parent,
        )
        assert proc.returncode == 78, proc.stderr
        assert "permission denied" in proc.stdout and path in proc.stdout
    else:
        with pytest.raises(ConfigError, match="permission denied"):
            config.load({}, path, {})


def test_secret_never_in_errors_or_render(tmp_path: Path) -> None:
    path = write(tmp_path / "s.ini", f"[main]\nsecret = {SECRET}\nmaster = m:1\n")
    settings, _ = config.load({}, path, {})
    assert settings.secret == SECRET
    assert SECRET not in repr(settings)
    text = config.render(settings)
    assert SECRET not in text and "secret = ********" in text
    # an invalid secret's error does not echo it either
    with pytest.raises(ConfigError) as err:
        config.load(cli_overrides(secret=SECRET + "\nX-Evil: 1"), path, {})
    assert SECRET not in str(err.value) and "line breaks" in str(err.value)


def test_tls_files_go_together(tmp_path: Path) -> None:
    cert = write(tmp_path / "cert.pem", "x")
    path = write(tmp_path / "t.ini", f"[main]\ndocker_tls_cert = {cert}\n")
    with pytest.raises(ConfigError, match="go together"):
        config.load({}, path, {})
    path = write(tmp_path / "u.ini", "[main]\ndocker = https://h:2376\n")
    with pytest.raises(ConfigError, match="needs docker_tls_cert"):
        config.load({}, path, {})
    path = write(tmp_path / "v.ini", f"[main]\ndocker_tls_ca = {tmp_path}/missing.pem\n")
    with pytest.raises(ConfigError, match="does not exist"):
        config.load({}, path, {})


def test_require_master_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "m.ini", "[main]\n")
    settings, _ = config.load({}, path, {})
    with pytest.raises(ConfigError, match=f"set 'master = host:port' in \\[main\\] of {path}"):
        settings.require_master()


def test_sample_config_documents_every_key_with_its_default() -> None:
    sample = PACKAGE / "data" / "dm-agent.ini"
    text = sample.read_text(encoding="utf-8")
    # every key shown at its default, commented out, but log_level: a packaged node logs
    # at INFO (docs/design.md §4), while the program's own default stays WARNING
    for key in config.KEYS:
        shown_as = f"{key.name} =" if key.name == "log_level" else f"#{key.name} ="
        assert shown_as in text, key.name
    settings, warnings = config.load({}, str(sample), {})
    assert warnings == []
    assert settings.master is None
    assert settings.log_level == 1 and settings.sources["log_level"].endswith("[main] log_level")
    assert config.Settings().log_level == 0
    for key in config.KEYS:
        if key.name in ("master", "log_level"):
            continue
        line = next(ln for ln in text.splitlines() if ln.startswith(f"#{key.name} ="))
        shown = line.split("=", 1)[1].strip()
        assert key.convert(shown) == key.convert(key.default), key.name


def test_bool_and_patterns() -> None:
    assert values.parse_bool("Yes") is True and values.parse_bool("off") is False
    with pytest.raises(ValueError, match="yes/no"):
        values.parse_bool("maybe")
    assert values.parse_patterns("lo, veth*  docker0") == ("lo", "veth*", "docker0")
    assert is_excluded("veth12ab", ("lo", "veth*"))
    assert not is_excluded("eth0", ("lo", "veth*"))


def test_secret_precedence_cli_env_credential_secret_file_file(tmp_path: Path) -> None:
    """-s > DM_AGENT_SECRET > $CREDENTIALS_DIRECTORY/secret > secret_file > secret."""
    creds = tmp_path / "creds"
    creds.mkdir()
    write(creds / "secret", "from-credential\n")
    write(tmp_path / "node.secret", "  from-secret-file\n")
    path = write(tmp_path / "p.ini",
                 "[main]\nsecret = from-file\nsecret_file = node.secret\n")
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    cases = [
        (cli_overrides(secret="from-cli"), {**env, "DM_AGENT_SECRET": "from-env"},
         "from-cli", "command line"),
        ({}, {**env, "DM_AGENT_SECRET": "from-env"}, "from-env",
         "environment DM_AGENT_SECRET"),
        ({}, env, "from-credential", f"systemd credential {creds}/secret"),
        ({}, {"CREDENTIALS_DIRECTORY": str(tmp_path / "empty")}, "from-secret-file",
         f"{path} [main] secret_file: secret_file {tmp_path}/node.secret"),
        ({}, {}, "from-secret-file", f"{path} [main] secret_file: secret_file "),
    ]
    for cli, environ, want, source in cases:
        settings, _ = config.load(cli, path, environ)
        assert settings.secret == want, (environ, settings.sources["secret"])
        assert settings.sources["secret"].startswith(source)
        assert "from-" not in config.render(settings)
    # a credential directory without a "secret" credential: the file's settings apply
    other = tmp_path / "other-creds"
    other.mkdir()
    write(other / "token", "unrelated")
    plain = write(tmp_path / "q.ini", "[main]\nsecret = from-file\n")
    settings, _ = config.load({}, plain, {"CREDENTIALS_DIRECTORY": str(other)})
    assert settings.secret == "from-file"


@pytest.mark.parametrize(("content", "expect"), [
    (b"", "is empty"),
    (b"\n \n", "is empty"),
    (b"s\xc3\xabcret\xe2\x9c\x93\n", "must be Latin-1"),
    (b"two\nlines\n", "control characters"),
    (b"\xff\xfe not utf-8", "not UTF-8"),
])
def test_bad_secret_file_is_a_config_error_without_the_value(
        tmp_path: Path, content: bytes, expect: str) -> None:
    (tmp_path / "node.secret").write_bytes(content)
    path = write(tmp_path / "b.ini", "[main]\nsecret_file = node.secret\n")
    with pytest.raises(ConfigError) as err:
        config.load({}, path, {})
    msg = str(err.value)
    assert expect in msg and "invalid secret" in msg
    assert msg.startswith(f"{path} [main] secret_file: secret_file {tmp_path}/node.secret")
    for word in (b"cret", b"two", b"lines"):
        assert word.decode() not in msg.replace("secret", "")
    assert err.value.exit_code == 78


def test_missing_secret_file_names_the_setting(tmp_path: Path) -> None:
    path = write(tmp_path / "c.ini", "[main]\nsecret_file = /nonexistent/node.secret\n")
    with pytest.raises(ConfigError, match=r"\[main\] secret_file: invalid secret_file = "
                                          r"'/nonexistent/node.secret': expected an existing"):
        config.load({}, path, {})


@pytest.mark.parametrize("bad", ["Qsëcret✓", "Qtab\there", "Qnul\0x", "Qdel\x7fx",
                                 "Qc1\x85x", "Qbell\x07", "Q\udcff-not-utf8-argv"])
def test_secret_that_cannot_travel_in_a_header_is_refused(tmp_path: Path, bad: str) -> None:
    path = write(tmp_path / "h.ini", "[main]\nmaster = m:1\n")
    for cli, env, where in [
        (cli_overrides(secret=bad), {}, "command line: invalid secret:"),
        ({}, {"DM_AGENT_SECRET": bad}, "environment DM_AGENT_SECRET: invalid secret:"),
    ]:
        with pytest.raises(ConfigError) as err:
            config.load(cli, path, env)
        assert str(err.value).startswith(where), str(err.value)
        assert bad not in str(err.value) and bad[:3] not in str(err.value)
    # Latin-1 is what http.client sends: accepted, as before
    settings, _ = config.load(cli_overrides(secret="sécret"), path, {})
    assert settings.secret == "sécret"


@pytest.mark.parametrize("url", ["http://user:pa55-w0rd@127.0.0.1:9",
                                    "https://user:pa55-w0rd@m.example/prefix",
                                    "user:pa55-w0rd@127.0.0.1:9", "http://pa55-w0rd@m:1"])
def test_master_url_with_credentials_is_refused_and_masked(tmp_path: Path, url: str) -> None:
    path = write(tmp_path / "u.ini", f"[main]\nmaster = {url}\n")
    with pytest.raises(ConfigError) as err:
        config.load({}, path, {})
    msg = str(err.value)
    assert "pa55-w0rd" not in msg
    assert f"{path} [main] master: invalid master = " in msg
    assert "must not carry credentials" in msg and "********@" in msg


def test_relative_paths_in_the_file_are_relative_to_its_directory(tmp_path: Path) -> None:
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    write(conf_dir / "ca.pem", "x")
    write(conf_dir / "node.secret", "s\n")
    path = write(conf_dir / "r.ini", "[main]\npidfile = run/a.pid\nlog_file = ../log/a.log\n"
                 "master_ca = ca.pem\nsecret_file = ./node.secret\n")
    start = tmp_path / "start"
    start.mkdir()
    write(start / "cli.pid", "")
    settings, _ = config.load({}, path, {}, cwd=str(start))
    assert settings.pidfile == f"{conf_dir}/run/a.pid"
    assert settings.log_file == f"{tmp_path}/log/a.log"
    assert settings.master_ca == f"{conf_dir}/ca.pem"
    assert settings.secret_file == f"{conf_dir}/node.secret"
    # the command line and the environment: against the starting directory, as is -f
    settings, _ = config.load(cli_overrides(pidfile="cli.pid"), "../etc/r.ini",
                              {"DM_AGENT_LOG_FILE": "x.log"}, cwd=str(start))
    assert settings.config_file == path
    assert settings.pidfile == f"{start}/cli.pid"
    assert settings.log_file == f"{start}/x.log"


def test_file_setting_behind_an_unreadable_directory_says_so(tmp_path: Path) -> None:
    """Not "does not exist": the dm-agent user meets a 0700 directory above the file. Root
    passes every directory, so as root the load runs as nobody; otherwise the directory
    is closed to its owner too."""
    message = "cannot be reached: permission denied on a directory above it"
    if os.geteuid() != 0:
        path = secret_file_behind_private_directory(tmp_path)
        os.chmod(tmp_path / "private", 0)
        try:
            with pytest.raises(ConfigError, match=message):
                config.load({}, path, {})
        finally:
            os.chmod(tmp_path / "private", 0o700)
        return
    import subprocess
    import sys
    import tempfile

    from agentproc import NOBODY, as_user

    with tempfile.TemporaryDirectory(prefix="dm-config-") as tmp:  # reachable by nobody
        os.chmod(tmp, 0o755)
        path = secret_file_behind_private_directory(Path(tmp))
        code = ("import sys; from dm_agent.config import settings as config\n"
                "try: config.load({}, sys.argv[1], {})\n"
                "except config.ConfigError as e: print(e); sys.exit(78)\n")
        proc = subprocess.run(
            as_user((NOBODY, NOBODY), [sys.executable, "-c", code, path]),
            capture_output=True, text=True, cwd=PACKAGE.parent)
    assert proc.returncode == 78, proc.stderr
    assert message in proc.stdout


def secret_file_behind_private_directory(tmp_path: Path) -> str:
    """``d.ini`` (0644) whose ``secret_file`` is in ``private/`` (0700)."""
    (tmp_path / "private").mkdir(mode=0o700)
    write(tmp_path / "private" / "node.secret", "s\n")
    path = write(tmp_path / "d.ini", f"[main]\nsecret_file = {tmp_path}/private/node.secret\n")
    os.chmod(path, 0o644)
    return path


def test_what_an_empty_value_means_is_said_alike_by_help_and_check_config() -> None:
    """One field of the key (``Key.empty``) says what an empty value means; ``--help``
    shows it in brackets, ``--check-config`` as the source of an empty default, but for
    the pidfile, whose path found at run time it shows instead."""
    from dm_agent.cli import EPILOG

    meant = [k for k in config.KEYS if k.empty]
    assert {k.name for k in meant} == {"address", "pidfile", "master_ca", "tunnel_key"}
    rendered = config.render(config.DEFAULTS, {"pidfile": "/run/x.pid"})
    for key in meant:
        assert f"\n  {key.name} = ({key.empty})\n" in EPILOG, key.name
    assert "\naddress =  ; default: the Docker TCP host:port, else the IP that routes" in rendered
    assert "\nmaster_ca =  ; default: the system CA store\n" in rendered
    assert "\npidfile = /run/x.pid  ; default\n" in rendered
    assert "\nlog_file =  ; default\n" in rendered  # unset means unset
