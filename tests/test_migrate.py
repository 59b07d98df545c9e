"""``dm-agent migrate``'s reading of the original agent, on a tree laid out as its
``install`` command leaves a node (the booted takeover is tests/test_fleet_unit.py).

The stand-in script is written here by the rules the issue gives (a ``default_value``
dict at its top); it is not the original's code.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from dm_agent.commands import migrate
from dm_agent.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def lay_out(root: Path, *, exec_args: str = "-v", ini_extra: str = "",
            script_body: str = "") -> migrate.OldAgent:
    units, bin_, etc = root / "etc/systemd/system", root / "usr/local/bin", root / "etc"
    units.mkdir(parents=True)
    bin_.mkdir(parents=True)
    script = bin_ / "node-agent.py"
    script.write_text(
        "#!/usr/bin/env python3\n"
        "default_value = {'docker': '10.0.0.5:2375', 'master': '10.0.0.1:8762',\n"
        "                 'timeout': 10, 'secret': 'dv-secret', 'colour': 'blue'}\n"
        + script_body)
    (units / "node-agent.service").write_text(
        "[Unit]\nDescription=node-agent\n\n[Service]\nType=simple\n"
        f"ExecStart={script} {exec_args}\nUser=agent\n\n[Install]\nWantedBy=multi-user.target\n")
    # ExecStart of a script named otherwise than the unit: not the install command's
    (units / "other.service").write_text(f"[Service]\nExecStart={bin_}/node-agent.py -v\n")
    (etc / "node-agent.ini").write_text(
        "[main]\n#docker = 1.2.3.4:2375\n#master = 1.2.3.4:8762\n#timeout = 10\n#log_level = 2\n"
        + ini_extra)
    found = migrate.find(str(units), str(bin_), str(etc))
    assert [o.name for o in found] == ["node-agent"]
    return found[0]


def settings(old: migrate.OldAgent) -> dict[str, tuple[str, str]]:
    got, _ = migrate.read_settings(old)
    return {s.key: (s.value, s.source) for s in got}


def test_precedence_exec_start_then_ini_then_default_value(tmp_path: Path) -> None:
    old = lay_out(tmp_path, exec_args="-v -t 4", ini_extra="master = 10.9.9.9:8762\n")
    assert old.user == "agent" and old.exec_start[1:] == ["-v", "-t", "4"]
    got = settings(old)
    assert got["timeout"] == ("4", f"ExecStart of {old.unit}")
    assert got["log_level"] == ("1", f"ExecStart of {old.unit}")
    assert got["master"] == ("10.9.9.9:8762", f"{old.ini} [main] master")
    assert got["docker"] == ("10.0.0.5:2375", f"default_value of {old.script}")
    assert got["secret"][0] == "dv-secret"
    _, notes = migrate.read_settings(old)
    assert any("'colour' is not a setting" in n for n in notes)


def test_the_script_is_parsed_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    old = lay_out(tmp_path, script_body=f"open({str(marker)!r}, 'w').write('x')\n")
    assert settings(old)["master"][0] == "10.0.0.1:8762"
    assert not marker.exists()
    Path(old.script).write_text(f"default_value = dict(master=open({str(marker)!r}, 'w'))\n")
    with pytest.raises(ConfigError, match="line 1: default_value is not a literal dict"):
        migrate.default_value(old.script)
    assert not marker.exists()


def test_new_text_goes_into_main_and_the_file_keeps_mode_and_owner(
        tmp_path: Path, other_user: tuple[int, int]) -> None:
    """Another user's file (root:dm-agent on a node): the rewrite keeps its owner, which
    only root can give a file."""
    ini = tmp_path / "dm-agent.ini"
    ini.write_text("# shipped\n[main]\n#master = x:1\n\n[other]\nkey = 1\n")
    uid, gid = other_user
    os.chown(ini, uid, gid)
    ini.chmod(0o640)
    text = migrate.new_text(ini.read_text(), [migrate.Setting("master", "10.0.0.1:8762", "x")],
                            "/etc/systemd/system/node-agent.service")
    assert text.index("master = 10.0.0.1:8762") < text.index("[other]")
    migrate.write_config(str(ini), text)
    st = ini.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, uid, gid)
    assert ini.read_text() == text
    assert [p.name for p in tmp_path.iterdir()] == ["dm-agent.ini"]  # no temporary left


MENTION = ("dm-agent: the original agent runs here as node-agent.service; take over its "
           "settings and stop it with: dm-agent migrate")


def _postinst_says(script: str, root: Path) -> str:
    done = subprocess.run(["sh", "-c", script, "postinst", "configure", ""], text=True,
                          capture_output=True, env={**os.environ, "DPKG_ROOT": str(root)},
                          check=True)
    return done.stderr


@pytest.mark.parametrize("package", ["deb", "rpm"])
def test_package_scripts_mention_migrate_when_an_old_unit_is_found(
        tmp_path: Path, package: str) -> None:
    if package == "deb":
        text = (REPO / "debian/dm-agent.postinst").read_text().replace("#DEBHELPER#", "")
        script = text
    else:  # %post of the spec, its one macro expanded the way rpm would, into a scratch root
        spec = (REPO / "rpm/dm-agent.spec").read_text()
        post = spec[spec.index("\n%post\n") + 7: spec.index("\n%preun")]
        script = "\n".join(ln for ln in post.splitlines() if not ln.startswith("%"))
        script = script.replace("%{_sysconfdir}", f"{tmp_path}/etc")
    (tmp_path / "etc").mkdir()
    assert MENTION not in _postinst_says(script, tmp_path)  # no unit dir at all
    units = tmp_path / "etc/systemd/system"
    units.mkdir(parents=True)
    # paths as the node sees them, inside DPKG_ROOT
    (units / "node-agent.service").write_text(
        "[Service]\nType=simple\nExecStart=/usr/local/bin/node-agent.py -v\n")
    (units / "other.service").write_text("[Service]\nExecStart=/usr/local/bin/node-agent.py\n")
    said = _postinst_says(script, tmp_path)
    assert said.count(MENTION) == 1, said  # node-agent.service only, not other.service


def test_old_settings_dm_agent_cannot_take_are_refused_naming_where(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        migrate._validate("[main]\nmaster = 10.0.0.1:8762\ntimeout = soon\n", "/etc/dm-agent.ini")
    assert str(exc.value).startswith("the old settings are not valid for dm-agent, nothing was "
                                     "changed: /etc/dm-agent.ini [main] timeout: invalid "
                                     "timeout = 'soon'"), exc.value
