"""Throwaway smoke program, frozen with dm-agent's spec (DM_FREEZE_SMOKE=1), never shipped.

It proves, inside the *frozen* runtime on a host without Python, what the product needs
from the modules PyInstaller had to find on its own (there is no PyInstaller hook for the
Docker SDK) and from the libraries the build root compiled:

- docker: ``docker.APIClient`` over a unix socket (the SDK's unixconn transport, which is
  only chosen at run time): /_ping, /version, /info, /containers/json?all=1.
- https: ``requests`` to a TLS server on 127.0.0.1 whose certificate a throwaway CA
  signed: the bundled OpenSSL 3 handshakes and verifies with ``verify=CAFILE``, and the
  same request with certifi's bundle (the default) fails verification, so certificates
  are really checked and certifi's CA file is in the bundle.
- ssl: libssl/libcrypto are the bundled OpenSSL 3 (from the program's own directory,
  per /proc/self/maps), not whatever the host has.
- psutil: CPU, memory, disks, network figures from /proc.
- python-daemon and lockfile import; dm_agent's package data (dm-agent.ini) is bundled.

Usage: dm-agent-smoke --docker-sock PATH --https-url URL --ca CAFILE
Prints one line per check and exits 0 when all pass, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable

RESULTS: list[tuple[str, bool, str]] = []


def check(name: str) -> Callable[[Callable[..., str]], Callable[..., None]]:
    def wrap(fn: Callable[..., str]) -> Callable[..., None]:
        def run(*args: object) -> None:
            try:
                RESULTS.append((name, True, fn(*args)))
            except Exception as exc:  # noqa: BLE001 - report every failure, keep going
                detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
                RESULTS.append((name, False, detail))
        return run
    return wrap


@check("runtime")
def runtime() -> str:
    assert getattr(sys, "frozen", False), "not running frozen"
    assert sys.version_info >= (3, 11), sys.version
    return f"frozen CPython {sys.version.split()[0]}, _MEIPASS={getattr(sys, '_MEIPASS', '?')}"


@check("ssl")
def ssl_lib() -> str:
    import hashlib
    import ssl

    assert ssl.OPENSSL_VERSION.startswith("OpenSSL 3."), ssl.OPENSSL_VERSION
    hashlib.sha256(b"dm-agent").hexdigest()
    with open("/proc/self/maps", encoding="ascii", errors="replace") as fh:
        libs = {line.split()[-1] for line in fh if "libssl" in line or "libcrypto" in line}
    home = os.path.realpath(getattr(sys, "_MEIPASS", "/nonexistent"))
    foreign = [lib for lib in libs if not os.path.realpath(lib).startswith(home + os.sep)]
    assert libs and not foreign, f"OpenSSL libraries loaded from outside the bundle: {foreign}"
    return f"{ssl.OPENSSL_VERSION}; loaded {sorted(os.path.basename(lib) for lib in libs)}"


@check("docker")
def docker_api(sock: str) -> str:
    import docker

    client = docker.APIClient(base_url=f"unix://{sock}", version="auto", timeout=5)
    assert client.ping() is True
    info = client.info()
    containers = client.containers(all=True)
    names = [c["Names"][0] for c in containers]
    assert info["Name"] == "smoke-node", info
    assert names == ["/web1", "/smoke-node/db1"], names
    return f"API {client.api_version}; Name={info['Name']}; containers={names}"


@check("https")
def https(url: str, ca: str) -> str:
    import certifi
    import requests

    resp = requests.get(url, verify=ca, timeout=5)
    assert resp.status_code == 200 and resp.text.strip() == "dm-agent-smoke-ok", resp.text
    assert os.path.isfile(certifi.where()), certifi.where()
    try:
        requests.get(url, timeout=5)  # certifi's bundle: must not trust the throwaway CA
    except requests.exceptions.SSLError as exc:
        assert "CERTIFICATE_VERIFY_FAILED" in str(exc) or "certificate verify failed" in str(exc), exc
    else:
        raise AssertionError("an unknown CA was trusted with certifi's bundle")
    return f"200 with verify=CAFILE; rejected with certifi ({os.path.basename(certifi.where())})"


@check("psutil")
def host_figures() -> str:
    import psutil

    psutil.cpu_percent(interval=None)
    load = psutil.cpu_percent(interval=0.2)
    mem = psutil.virtual_memory()
    root = psutil.disk_usage("/")
    parts = psutil.disk_partitions(all=False)
    nics = psutil.net_io_counters(pernic=True)
    assert 0.0 <= load <= 100.0 and mem.total > 0 and root.total > 0, (load, mem, root)
    return (f"psutil {psutil.__version__}: cpu {load:.1f}%, mem {mem.total >> 20} MiB, "
            f"/ {root.total >> 30} GiB, {len(parts)} partitions, nics {sorted(nics)}")


@check("daemon")
def daemon_libs() -> str:
    import daemon
    import daemon.pidfile  # noqa: F401
    import lockfile  # noqa: F401

    assert callable(daemon.DaemonContext)
    return "daemon.DaemonContext, daemon.pidfile, lockfile"


@check("package-data")
def package_data() -> str:
    from importlib import resources

    import dm_agent

    ini = resources.files("dm_agent").joinpath("data/dm-agent.ini").read_text(encoding="utf-8")
    assert "[main]" in ini
    return f"dm_agent {dm_agent.__version__}: data/dm-agent.ini ({len(ini)} bytes)"


def main() -> int:
    ap = argparse.ArgumentParser(prog="dm-agent-smoke")
    ap.add_argument("--docker-sock", required=True)
    ap.add_argument("--https-url", required=True)
    ap.add_argument("--ca", required=True)
    args = ap.parse_args()
    runtime()
    ssl_lib()
    docker_api(args.docker_sock)
    https(args.https_url, args.ca)
    host_figures()
    daemon_libs()
    package_data()
    for name, ok, detail in RESULTS:
        print(f"{'ok  ' if ok else 'FAIL'} {name:13} {detail}")
    return 0 if all(ok for _, ok, _ in RESULTS) else 1


if __name__ == "__main__":
    sys.exit(main())
