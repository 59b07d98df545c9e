"""docs/gateway-ca.md's commands, run as the page writes them: the cluster CA, a node's
certificate signed by it, and the agent accepting that pair for its gateway."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import bcrypt
from agentproc import run

DOC = Path(__file__).resolve().parent.parent / "docs" / "gateway-ca.md"


def section(title: str) -> str:
    text = DOC.read_text(encoding="utf-8")
    start = text.index(title)
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else len(text)]


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def test_the_pages_commands_issue_a_pair_the_gateway_accepts(tmp_path: Path) -> None:
    script = "\n".join(blocks(section("## 1. The cluster CA"), "sh")
                       + blocks(section("## 2. A certificate per node"), "sh"))
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "node7.crt: OK" in proc.stdout
    san = subprocess.run(["openssl", "x509", "-in", "node7.crt", "-noout", "-ext",
                          "subjectAltName,extendedKeyUsage,basicConstraints"], cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout
    assert "DNS:node7" in san and "IP Address:10.0.0.11" in san
    assert "TLS Web Server Authentication" in san and "CA:FALSE" in san
    # section 3's ini, with the files where this test made them
    (ini_text,) = blocks(section("## 3. The node"), "ini")
    hashed = bcrypt.hashpw(b"cluster password", bcrypt.gensalt(4)).decode()
    ini_text = (ini_text.replace("/etc/dm-agent/gateway/gateway.crt", str(tmp_path / "node7.crt"))
                .replace("/etc/dm-agent/gateway/gateway.key", str(tmp_path / "node7.key"))
                .replace("$2b$12$…   # dm-agent hash-password", hashed))
    (tmp_path / "dm-agent.ini").write_text(ini_text + "master = 10.0.0.3:8761\n")
    check = run(["--check-config", "-f", str(tmp_path / "dm-agent.ini")], tmp_path)
    assert check.returncode == 0, check.stderr
    assert f"gateway_cert = {tmp_path}/node7.crt" in check.stdout
    # and the CA's key is not what the node gets: a mismatched pair is refused
    (tmp_path / "dm-agent.ini").write_text(
        ini_text.replace(str(tmp_path / "node7.key"), str(tmp_path / "cluster-ca.key"))
        + "master = 10.0.0.3:8761\n")
    (tmp_path / "cluster-ca.key").chmod(0o600)
    refused = run(["--check-config", "-f", str(tmp_path / "dm-agent.ini")], tmp_path)
    assert refused.returncode == 78 and "does not match" in refused.stderr
