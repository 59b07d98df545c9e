"""The real dm-agent program's command line: exit codes, messages, the secret kept out."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from agentproc import BIN, NO_DOCKER, clean_env, popen, run, stop
from support.master import Master

from dm_agent import __version__

SECRET = "Zq9-very-secret-token"


def ini(home: Path, body: str, name: str = "dm-agent.ini") -> Path:
    path = home / name
    path.write_text("[main]\n" + body, encoding="utf-8")
    return path


def test_version(tmp_path: Path) -> None:
    proc = run(["--version"], tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == f"dm-agent {__version__}"


def test_help_lists_seed_flags(tmp_path: Path) -> None:
    proc = run(["-h"], tmp_path)
    assert proc.returncode == 0
    for flag in ("-d DOCKER", "-m MASTER", "-t TIMEOUT", "-v", "-f CONFIG", "-s SECRET",
                 "--daemon", "--pidfile", "--once", "--dry-run", "--check-config", "--version"):
        assert flag in proc.stdout, flag


@pytest.mark.parametrize("args", [["--bogus"], ["-t"], ["--once", "--daemon"], ["extra"],
                                  ["--once", "--check-config"], ["--daemon", "--check-config"]])
def test_usage_errors_exit_64(tmp_path: Path, args: list[str]) -> None:
    proc = run(args, tmp_path)
    assert proc.returncode == 64, proc.stderr
    assert "dm-agent" in proc.stderr and "Traceback" not in proc.stderr
    # the program's name once: it printed "dm-agent: dm-agent: --daemon, --once …"
    assert "dm-agent: dm-agent" not in proc.stderr, proc.stderr


def test_exclusive_switches_say_so_in_one_line(tmp_path: Path) -> None:
    proc = run(["--once", "--check-config"], tmp_path)
    assert proc.stderr == "dm-agent: --daemon, --once and --check-config exclude each other\n"


@pytest.mark.parametrize(
    ("body", "args", "expect"),
    [
        ("timeout = ten\n", [], "invalid timeout = 'ten': expected a whole number"),
        ("timeout = 0\n", [], "invalid timeout = '0': expected at least 1"),
        ("timeout = -3\n", [], "expected at least 1"),
        ("master = 10.0.0.1\n", [], "invalid master = '10.0.0.1': expected host:port"),
        ("master = ftp://m:1\n", [], "unknown scheme 'ftp'"),
        ("docker = 10.0.0.1\n", [], "invalid docker = '10.0.0.1'"),
        ("docker = smb://x:1\n", [], "unknown scheme 'smb'"),
        ("log_level = 5\n", [], "expected 0 (WARNING), 1 (INFO) or 2 (DEBUG)"),
        ("", ["-t", "x"], "command line: invalid timeout = 'x'"),
        ("", [], "master is not set"),
    ],
)
def test_config_errors_exit_78_naming_file_key_value(
        tmp_path: Path, body: str, args: list[str], expect: str) -> None:
    path = ini(tmp_path, f"secret = {SECRET}\n" + body)
    for mode in (["--once"], ["--check-config"], ["--daemon", "--pidfile", str(tmp_path / "p")]):
        proc = run(["-f", str(path), *args, *mode], tmp_path)
        assert proc.returncode == 78, (mode, proc.stderr)
        assert expect in proc.stderr, proc.stderr
        if "command line" not in expect and "not set" not in expect:
            assert str(path) in proc.stderr
        assert SECRET not in proc.stderr + proc.stdout
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "p").exists()


def test_unreadable_and_missing_config(tmp_path: Path) -> None:
    proc = run(["-f", str(tmp_path / "missing.ini"), "--once"], tmp_path)
    assert proc.returncode == 78 and "missing.ini: it does not exist" in proc.stderr
    (tmp_path / "broken.ini").write_text("no section here\n")
    proc = run(["-f", str(tmp_path / "broken.ini"), "--check-config"], tmp_path)
    assert proc.returncode == 78 and "cannot parse config file" in proc.stderr


def test_unknown_key_is_a_warning(tmp_path: Path) -> None:
    path = ini(tmp_path, "master = 127.0.0.1:9\nfavourite = blue\n")
    proc = run(["-f", str(path), "--check-config"], tmp_path)
    assert proc.returncode == 0
    assert f"{path}: unknown key 'favourite'" in proc.stderr


def test_check_config_prints_effective_settings_secret_masked(tmp_path: Path) -> None:
    ini(tmp_path, f"master = 127.0.0.1:9\nsecret = {SECRET}\n")
    proc = run(["--check-config", "-t", "5"], tmp_path, {"DM_AGENT_LOG_LEVEL": "2"})
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "master = http://127.0.0.1:9" in out and "dm-agent.ini [main] master" in out
    assert "timeout = 5  ; command line" in out
    assert "log_level = 2  ; environment DM_AGENT_LOG_LEVEL" in out
    assert "secret = ********" in out
    assert SECRET not in out + proc.stderr


def test_once_dry_run_without_master_or_docker(tmp_path: Path) -> None:
    proc = run(["--once", "--dry-run", "-d", NO_DOCKER, "-s", SECRET, "-vv"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    body = json.loads(proc.stdout)
    assert body["containers"] == [] and body["id"] == body["name"]
    assert isinstance(body["system"]["cpuLoad"], float)
    assert "cannot reach Docker at unix:///nonexistent/docker.sock" in proc.stderr
    assert "reporting host figures only" in proc.stderr
    assert "- DEBUG - do registration with {" in proc.stderr
    assert SECRET not in proc.stdout + proc.stderr


def test_once_fails_with_1_when_master_unreachable(tmp_path: Path) -> None:
    proc = run(["--once", "-d", NO_DOCKER, "-m", "127.0.0.1:9", "-t", "2"], tmp_path)
    assert proc.returncode == 1
    assert "- ERROR - cannot reach http://127.0.0.1:9: Connection refused" in proc.stderr


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_during_once_dies_of_sigint(tmp_path: Path, master: Master) -> None:
    """Ctrl-C outside the loop: killed by SIGINT as a shell expects (docs/configuration.md, *Exit
    codes*), which lets a script's loop over dm-agent stop; ``$?`` is 130; no traceback."""
    master.set_mode("hang")  # the registration stays in flight
    args = ["--once", "-d", NO_DOCKER, "-m", master.url, "-t", "60"]
    # as from an interactive shell: SIGINT at its default, also when this suite runs in
    # the background of a shell without job control (which starts it ignored, inherited)
    proc = popen(args, tmp_path, preexec_fn=_default_sigint)
    master.wait_for(1, timeout=15)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == -signal.SIGINT, err  # a signal's death, not exit(130)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err

    shell = subprocess.Popen(["sh", "-c", '"$@"; echo "status $?"', "sh", BIN, *args],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=tmp_path, env=clean_env(tmp_path), stdin=subprocess.DEVNULL,
                             preexec_fn=_default_sigint)
    master.wait_for(2, timeout=15)
    (agent,) = psutil.Process(shell.pid).children()
    agent.send_signal(signal.SIGINT)
    out, err = shell.communicate(timeout=10)
    assert out == "status 130\n", err


@pytest.mark.parametrize("spelling", [
    ["-s", SECRET], [f"-s{SECRET}"], ["--secret", SECRET], [f"--secret={SECRET}"],
    ["-vs", SECRET], [f"-vs{SECRET}"], ["-vvs", SECRET], [f"-s={SECRET}"],
], ids=lambda s: " ".join(s).replace(SECRET, "S"))
def test_secret_in_any_spelling_is_not_in_ps(tmp_path: Path, spelling: list[str]) -> None:
    """Every spelling argparse accepts for -s: the running process's own cmdline (what
    ps shows every user) no longer holds it, and the master still gets the secret."""
    with Master(secret=SECRET) as m:
        proc = popen(["-d", NO_DOCKER, "-m", m.address, "-t", "30", *spelling], tmp_path)
        try:
            reg = m.wait_for(1, timeout=20)[0]  # sent after the re-exec
            cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        finally:
            proc.terminate()
            out, err = proc.communicate(timeout=10)
        m.assert_valid()
    assert reg.auth_ok is True
    assert SECRET.encode() not in cmdline, cmdline
    assert f"--master={m.address}".encode() in cmdline  # the rest of the command line is kept
    if spelling[0].startswith("-v"):
        assert b"--verbose" in cmdline
    assert SECRET not in out + err


@pytest.mark.parametrize("spelling", [["--sec", SECRET], [f"--secr={SECRET}"]])
def test_abbreviations_are_refused_without_echoing_the_value(
        tmp_path: Path, spelling: list[str]) -> None:
    proc = run(["--once", "-m", "127.0.0.1:9", *spelling], tmp_path)
    assert proc.returncode == 64, proc.stderr
    assert "unrecognized arguments: --se" in proc.stderr
    assert SECRET not in proc.stdout + proc.stderr


@pytest.mark.parametrize("bad", ["sëcret✓", "two\tparts", "bell\x07"])
def test_secret_unfit_for_a_header_exits_78_before_any_round(tmp_path: Path, bad: str) -> None:
    """The issue's case: requests raised UnicodeEncodeError inside the round. Now the
    configuration is refused, naming the setting and its source, never the value."""
    path = ini(tmp_path, "master = 127.0.0.1:9\n")
    for how, args, env, where in [
        ("-s", ["-s", bad], {}, "command line: invalid secret:"),
        ("env", [], {"DM_AGENT_SECRET": bad}, "environment DM_AGENT_SECRET: invalid secret:"),
    ]:
        for mode in (["--once"], ["--check-config"],
                     ["--daemon", "--pidfile", str(tmp_path / "p")]):
            proc = run(["-f", str(path), "-d", NO_DOCKER, *args, *mode], tmp_path, env)
            assert proc.returncode == 78, (how, mode, proc.stderr)
            assert where in proc.stderr, proc.stderr
            assert "Traceback" not in proc.stderr
            assert bad not in proc.stdout + proc.stderr
    assert not (tmp_path / "p").exists()


def test_master_url_credentials_are_refused_and_never_printed(tmp_path: Path) -> None:
    path = ini(tmp_path, "master = http://admin:pa55-w0rd@127.0.0.1:9\n")
    for mode in (["--once"], ["--check-config"], ["--daemon", "--pidfile", str(tmp_path / "p")]):
        proc = run(["-f", str(path), *mode], tmp_path)
        assert proc.returncode == 78, proc.stderr
        assert "must not carry credentials" in proc.stderr
        assert "http://********@127.0.0.1:9" in proc.stderr
        assert "pa55-w0rd" not in proc.stdout + proc.stderr and "admin" not in proc.stderr


def test_reexec_command_line_keeps_every_flag_but_the_secret() -> None:
    """without_secret() rebuilds the command line from the parsed flags: a flag added to
    the parser and forgotten there would be dropped silently by the re-exec."""
    from dm_agent import cli

    full = ["-d", "unix:///d.sock", "-m", "m:1", "-t", "5", "-vv", "-f", "a b.ini",
            "-s", SECRET, "--pidfile", "=p", "--gateway", "127.0.0.1:8771", "--daemon",
            "--once", "--dry-run",
            "--check-config"]
    args = cli._parse(full)
    every = set(vars(cli._parse([])))
    assert {k for k, v in vars(args).items() if v not in (None, False, 0)} == every, \
        "a new flag: give it a value in this test and a place in cli.without_secret()"
    again = cli._parse(cli.without_secret(args))
    assert again.secret is None
    assert {**vars(again), "secret": SECRET} == vars(args)



@pytest.mark.parametrize(("docker", "manageable"), [(NO_DOCKER, False),
                                                    ("tcp://127.0.0.1:9", True)])
def test_the_start_line_says_when_the_master_cannot_manage_the_node(
        tmp_path: Path, master_factory: Callable[..., Master], docker: str,
        manageable: bool) -> None:
    """A node whose Docker is on a unix socket, without the gateway, is one the master
    lists but cannot manage: the journal's start line says so, not only --check-config
    and status (Docker on TCP is reached by the master itself). One master generation:
    the subject is the start line."""
    master = master_factory()
    proc = popen(["-d", docker, "-m", master.url, "-v"], tmp_path)
    try:
        master.wait_for(1)
    finally:
        err = stop(proc)
    (start,) = [line for line in err.splitlines() if " - INFO - started: " in line]
    if manageable:
        assert start.endswith(", gateway off"), start
    else:
        assert ", gateway off; the master cannot manage this node's Docker: Docker is on a " \
            "unix socket (/nonexistent/docker.sock)" in start, start
        assert start.endswith("set gateway = 0.0.0.0:8771 and gateway_password_hash "
                              "(docs/gateway.md)"), start


def test_a_proxy_or_docker_host_in_the_environment_is_not_used_and_said_so(
        tmp_path: Path, master_factory: Callable[..., Master]) -> None:
    """HTTP(S)_PROXY, ALL_PROXY and DOCKER_HOST all point at one listener on loopback: the
    registration reaches the master directly (requests would send it through the proxy,
    127.0.0.1 included, unless told not to), nothing connects to the listener, and each
    variable is named in a warning without its value."""
    master = master_factory()
    with socket.socket() as trap:
        trap.bind(("127.0.0.1", 0))
        trap.listen()
        trap.setblocking(False)
        url = f"http://proxy-user:pr0xy-pw@127.0.0.1:{trap.getsockname()[1]}"
        env = {name: url for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY",
                                       "https_proxy", "ALL_PROXY")}
        env["DOCKER_HOST"] = f"tcp://127.0.0.1:{trap.getsockname()[1]}"
        proc = run(["--once", "-m", master.url, "-v"], tmp_path, env)
        with pytest.raises(BlockingIOError):
            trap.accept()  # nobody came
    assert proc.returncode == 0, proc.stderr
    assert len(master.requests) == 1
    for name in env:
        assert f"WARNING - {name} is set but not used: " in proc.stderr, name
    assert "pr0xy-pw" not in proc.stderr
    check = run(["--check-config", "-m", master.url], tmp_path, {"https_proxy": url})
    assert check.returncode == 0
    assert "dm-agent: warning: https_proxy is set but not used: the master is reached " \
        "directly, never through a proxy" in check.stderr, check.stderr
