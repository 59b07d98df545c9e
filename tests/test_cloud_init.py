"""The #cloud-config snippet (deploy/cloud-init/dm-agent.cloud-config.yml): it parses as
YAML, names the same repository, key file, key URL and apt source as the Ansible role
(and the role's example inventory), and its fingerprint check, run for real with gpg,
accepts the pinned key alone and refuses any other key or a second one beside it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import jinja2
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
SNIPPET = REPO / "deploy/cloud-init/dm-agent.cloud-config.yml"
ROLE = REPO / "deploy/ansible/roles/dm_agent"
INVENTORY = REPO / "deploy/ansible/inventory.example.yml"


def snippet() -> dict[str, Any]:
    data = yaml.safe_load(SNIPPET.read_text())
    assert isinstance(data, dict)
    return data


def script() -> str:
    (command,) = snippet()["runcmd"]
    assert command[:2] == ["sh", "-euc"], command
    return str(command[2])


def assignment(name: str) -> str:
    m = re.search(rf"^{name}=(\S+)$", script(), re.M)
    assert m, f"no {name}= in the snippet's script"
    return m.group(1)


def role_task(name: str) -> dict[str, Any]:
    tasks = yaml.safe_load((ROLE / "tasks/package_apt.yml").read_text())
    return next(t for t in tasks if t["name"] == name)


def render(template: str, **values: str) -> str:
    return jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(template).render(
        **values)


def test_is_cloud_config() -> None:
    assert SNIPPET.read_text().startswith("#cloud-config\n")
    data = snippet()
    assert set(data) == {"packages", "write_files", "runcmd"}
    ini, *gateway_files = data["write_files"]
    assert [f["path"] for f in gateway_files] == ["/run/dm-agent-cloud-init/gateway.crt",
                                                  "/run/dm-agent-cloud-init/gateway.key"]
    assert ini["permissions"] == "0600" and ini["path"].startswith("/run/")
    assert re.search(r"^\[main\]\nmaster = \S+\nsecret = \S+\ntimeout = \d+$",
                     ini["content"], re.M), ini["content"]
    assert f"-f {ini['path']}" in script() and f"install -m 0640 -o root -g dm-agent " \
        f"{ini['path']} /etc/dm-agent.ini" in script()


def test_names_the_roles_repository_and_key() -> None:
    url, fingerprint = assignment("url"), assignment("fingerprint")
    example = yaml.safe_load(INVENTORY.read_text())["dm_agent"]["vars"]
    assert url == example["dm_agent_repo_url"]
    assert fingerprint == example["dm_agent_repo_key_fingerprint"]
    key_file = assignment("key")
    assert key_file == role_task("Install the repository key")["ansible.builtin.copy"]["dest"]
    defaults = yaml.safe_load((ROLE / "defaults/main.yml").read_text())
    key_url = render(defaults["dm_agent_repo_key_url"], dm_agent_repo_url=url)
    assert '"$url/dm-agent-archive-keyring.asc"' in script()
    assert key_url == f"{url}/dm-agent-archive-keyring.asc"
    # the same source line as the role's, once both are filled in
    source = role_task("Add the apt source")["ansible.builtin.copy"]
    role_line = next(ln for ln in render(source["content"], dm_agent_repo_url=url).splitlines()
                     if ln.startswith("deb "))
    m = re.search(r'^echo "(deb .*)" >(\S+)$', script(), re.M)
    assert m, "no apt source line in the snippet"
    assert m.group(2) == source["dest"]
    assert m.group(1).replace("$key", key_file).replace("$url", url) == role_line


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two throwaway signing keys, exported armored: one alone, and both in one file."""
    home = tmp_path_factory.mktemp("gnupg")
    home.chmod(0o700)
    fprs = []
    for who in ("pinned", "other"):
        subprocess.run(["gpg", "--batch", "--homedir", str(home), "--passphrase", "",
                        "--quick-gen-key", f"{who} <{who}@dm-agent.invalid>", "ed25519", "sign",
                        "1d"], check=True, capture_output=True)
        out = subprocess.run(["gpg", "--batch", "--homedir", str(home), "--with-colons",
                              "--list-keys", f"{who}@dm-agent.invalid"], check=True,
                             capture_output=True, text=True).stdout
        fprs.append(re.findall(r"^fpr:+([0-9A-F]{40}):", out, re.M)[0])
    files = {}
    for name, selectors in (("alone", [fprs[0]]), ("other", [fprs[1]]), ("both", fprs)):
        path = home / f"{name}.asc"
        path.write_bytes(subprocess.run(["gpg", "--batch", "--homedir", str(home), "--armor",
                                         "--export", *selectors], check=True,
                                        capture_output=True).stdout)
        files[name] = path
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True)
    return {"pinned": fprs[0], "files": files}


@pytest.mark.parametrize(("offered", "accepted"),
                         [("alone", True), ("other", False), ("both", False)])
def test_fingerprint_check(keys: dict[str, Any], offered: str, accepted: bool) -> None:
    """The snippet's own lines from ``home=$(mktemp -d)`` to its ``if ... fi``, run by sh
    with the key file in place of what curl fetched."""
    text = script()
    start = text.index("home=$(mktemp -d)")
    end = text.index("fi\n", start) + 3
    check = text[start:end]
    path = keys["files"][offered]
    run = subprocess.run(
        ["sh", "-euc", f'key={path.with_suffix("")}\nurl=https://packages.invalid\n'
         f'fingerprint={keys["pinned"]}\ncp "{path}" "$key.new"\n{check}echo accepted\n'],
        capture_output=True, text=True)
    if accepted:
        assert run.returncode == 0 and run.stdout == "accepted\n", run.stderr
    else:
        assert run.returncode == 1 and "accepted" not in run.stdout, run.stdout
        assert "is not the one key" in run.stderr, run.stderr


def test_the_gateway_settings_and_files_have_their_place() -> None:
    """The gateway (docs/gateway.md): its keys are in the settings, commented out, and its
    certificate and key, when pasted, are installed for the agent before the settings
    are checked (a gateway_cert that does not exist yet would fail the check)."""
    files = {f["path"]: f for f in snippet()["write_files"]}
    settings = files["/run/dm-agent-cloud-init.ini"]["content"]
    for key in ("gateway", "gateway_password_hash", "gateway_cert", "gateway_key"):
        assert re.search(rf"^#{key} = ", settings, re.M), key
    for name in ("gateway.crt", "gateway.key"):
        assert files[f"/run/dm-agent-cloud-init/{name}"]["permissions"] == "0600"
    text = script()
    install = text.index('install -m 0640 -o root -g dm-agent "/run/dm-agent-cloud-init/$f"')
    assert install < text.index("dm-agent --check-config -f /run/dm-agent-cloud-init.ini")
