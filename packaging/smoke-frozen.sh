#!/usr/bin/env bash
# Smoke-test the frozen dm-agent inside a bare Debian 11 root that has no Python at all
# (a cached `debootstrap --variant=minbase bullseye`: glibc 2.31, no libssl3, no python3).
#
# What it proves (every step must pass):
#  1. The bare root has no python3 and no OpenSSL 3, so nothing can come from the host.
#  2. `ldd` of the executable and of the bundled libraries, as seen in that root: what
#     the frozen program needs from the system is glibc and nothing else (printed).
#  3. `dm-agent --version` prints __version__, directly, through a symlink in $PATH, and
#     from the unpacked dist/ tarball (when it is newer than the onedir).
#  4. The throwaway smoke program (packaging/smoke_frozen.py, frozen with the same spec
#     into build/smoke/) exercises, in the frozen runtime: docker.APIClient over a unix
#     socket against a fake Docker Engine; requests over https to a TLS server on
#     127.0.0.1 with a throwaway CA (verified, and refused with certifi's bundle); that
#     libssl/libcrypto are the bundled OpenSSL 3; psutil's CPU/memory/disk/net figures;
#     python-daemon/lockfile imports; dm_agent's package data.
#  5. The product itself, configured for that fake Docker Engine and that https master
#     (master_ca = the throwaway CA): --check-config, --once --dry-run (the payload holds
#     the fake engine's name and containers), --once (the master receives the POST with the
#     secret header), -s SECRET (the CLI re-executes itself to hide the secret from argv:
#     the frozen re-exec must work), and --daemon (double fork from the onedir: the
#     daemon keeps registering after the starting process exited, stops on SIGTERM and
#     removes its pidfile) -- the path onefile would break.
#
# The servers run on the host (python3, openssl), on 127.0.0.1 and on a unix socket inside
# the bare root; no traffic leaves the machine.
#
# Usage: packaging/smoke-frozen.sh   (builds build/frozen with freeze.sh if it is missing,
#                                     and always rebuilds build/smoke with freeze.sh --smoke)
# Environment: DM_BAREROOT (default /var/cache/dm-agent/bareroot-bullseye),
#              DM_DEBIAN_MIRROR (default http://deb.debian.org/debian),
#              DM_FROZEN_DIR (default build/frozen/dm-agent).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
BARE=${DM_BAREROOT:-/var/cache/dm-agent/bareroot-bullseye}
MIRROR=${DM_DEBIAN_MIRROR:-http://deb.debian.org/debian}
FROZEN=${DM_FROZEN_DIR:-$REPO/build/frozen/dm-agent}
BARE_KEY="bullseye minbase v1"

LOG_TAG=smoke LOG_DIE_WORD=FAIL
# shellcheck source=packaging/log.sh
. "$HERE/log.sh"
# shellcheck source=packaging/build-env.sh
. "$HERE/build-env.sh"
[[ $(id -u) == 0 ]] || die "must run as root (debootstrap, chroot, mount)"
for tool in debootstrap chroot openssl python3 flock; do
  command -v "$tool" >/dev/null || die "missing host tool: $tool"
done

VERSION=$(dm_version)
[[ -x $FROZEN/dm-agent ]] || "$HERE/freeze.sh"
"$HERE/freeze.sh" --smoke
SMOKE=$REPO/build/smoke/dm-agent-smoke

# --- cleanup: servers, the daemon, mounts, temp files -- on every exit -------------------
# shellcheck source=packaging/mounts.sh
. "$HERE/mounts.sh"
PIDS=()
TMP=$(mktemp -d /tmp/dm-smoke.XXXXXX)
cleanup() {
  local pid
  if [[ -s $BARE/run/dm-smoke/agent.pid ]]; then
    pid=$(cat "$BARE/run/dm-smoke/agent.pid")
    if [[ $pid =~ ^[0-9]+$ ]]; then kill -KILL "$pid" 2>/dev/null || true; fi
  fi
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  umount_all
  rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- the bare root (cached) ---------------------------------------------------------------
if [[ ! -f $BARE/.dm-bareroot-key || $(cat "$BARE/.dm-bareroot-key") != "$BARE_KEY" ]]; then
  log "creating the bare root $BARE"
  safe_rm_tree "$BARE.new"
  debootstrap --variant=minbase bullseye "$BARE.new" "$MIRROR" >"$TMP/debootstrap.log" 2>&1 ||
    { tail -20 "$TMP/debootstrap.log" >&2; die "debootstrap failed"; }
  apt_clean=("$BARE.new"/var/cache/apt/archives/*.deb)
  rm -f "${apt_clean[@]}"
  echo "$BARE_KEY" >"$BARE.new/.dm-bareroot-key"
  safe_rm_tree "$BARE"
  mv "$BARE.new" "$BARE"
fi
log "bare root: $BARE (Debian $(cat "$BARE/etc/debian_version"))"

# In the root: plain sh, no Python; $1.. are passed through.
in_bare() {
  chroot "$BARE" /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin \
    HOME=/root LANG=C.UTF-8 /bin/sh -eu -c "$@"
}
mount_api "$BARE"

# 1. nothing to borrow from the system
# shellcheck disable=SC2016
in_bare 'for p in python3 python python3.9 python2; do
           if command -v "$p" >/dev/null; then echo "$p is installed: $(command -v "$p")"; exit 1; fi
         done
         if ls /usr/lib/x86_64-linux-gnu/libssl.so.3 /lib/x86_64-linux-gnu/libssl.so.3 2>/dev/null; then
           echo "libssl.so.3 is installed"; exit 1; fi' || die "the bare root is not bare"
log "ok: no python3 and no libssl.so.3 in the bare root"

safe_rm_tree "$BARE/opt/dm-smoke"
safe_rm_tree "$BARE/run/dm-smoke"
mkdir -p "$BARE/opt/dm-smoke" "$BARE/run/dm-smoke" "$BARE/usr/local/bin"
cp -a "$FROZEN" "$BARE/opt/dm-smoke/dm-agent"
cp -a "$SMOKE" "$BARE/opt/dm-smoke/dm-agent-smoke"
ln -sfn /opt/dm-smoke/dm-agent/dm-agent "$BARE/usr/local/bin/dm-agent"

# 2. ldd, as the bare root sees it
# shellcheck disable=SC2016
in_bare "py=python$PY_MM; ext=cpython-${PY_MM/./}-x86_64-linux-gnu.so"'
         cd /opt/dm-smoke/dm-agent
         for f in dm-agent _internal/lib$py.so.1.0 _internal/libssl.so.3 \
                  _internal/$py/lib-dynload/_ssl.$ext; do
           echo "== ldd $f"; ldd "$f" | sed "s/ (0x[0-9a-f]*)//"
         done' | tee "$TMP/ldd.txt"
if sed -n '/== ldd dm-agent$/,/== ldd/p' "$TMP/ldd.txt" | grep -q 'not found'; then
  die "the executable needs a library the bare root does not have"
fi
if grep -vE '^==|linux-vdso|libc\.so|libm\.so|libdl\.so|libpthread\.so|librt\.so|libutil\.so|ld-linux|libz\.so|not found|libssl\.so|libcrypto\.so|statically' \
  "$TMP/ldd.txt" | grep -q .; then
  log "note: unexpected system libraries above"
fi

# 3. --version
got=$(in_bare '/opt/dm-smoke/dm-agent/dm-agent --version') || die "dm-agent --version failed: $got"
[[ $got == *"$VERSION"* ]] || die "dm-agent --version printed '$got', expected $VERSION"
got=$(in_bare 'cd /tmp && dm-agent --version') || die "dm-agent --version through a symlink failed"
[[ $got == *"$VERSION"* ]] || die "dm-agent (symlink) --version printed '$got'"
log "ok: dm-agent --version: $got (directly and through /usr/local/bin/dm-agent)"
TARBALL=$REPO/dist/dm-agent-$VERSION-linux-x86_64.tar.gz
if [[ -f $TARBALL && $TARBALL -nt $FROZEN/dm-agent ]]; then
  tar -C "$BARE/opt/dm-smoke" -xzf "$TARBALL"
  got=$(in_bare "/opt/dm-smoke/dm-agent-$VERSION/dm-agent --version") ||
    die "dm-agent --version from the tarball failed"
  log "ok: the tarball unpacks to dm-agent-$VERSION/ and runs: $got"
fi

# --- the host side: throwaway CA, a TLS master on 127.0.0.1, a fake Docker Engine ----------
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
  -subj /CN=dm-agent-smoke-CA -keyout "$TMP/ca.key" -out "$TMP/ca.pem" \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
  2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=127.0.0.1 \
  -keyout "$TMP/srv.key" -out "$TMP/srv.csr" 2>/dev/null
printf '%s\n' 'subjectAltName=IP:127.0.0.1' 'basicConstraints=critical,CA:FALSE' \
  'keyUsage=critical,digitalSignature' 'extendedKeyUsage=serverAuth' \
  'subjectKeyIdentifier=hash' 'authorityKeyIdentifier=keyid' >"$TMP/srv.ext"
openssl x509 -req -in "$TMP/srv.csr" -CA "$TMP/ca.pem" -CAkey "$TMP/ca.key" \
  -CAcreateserial -days 1 -extfile "$TMP/srv.ext" -out "$TMP/srv.pem" 2>/dev/null
cp "$TMP/ca.pem" "$BARE/opt/dm-smoke/ca.pem"

cat >"$TMP/servers.py" <<'PY'
"""Smoke servers: an https 'master' on 127.0.0.1 and a fake Docker Engine on a unix socket."""
import http.server, json, os, socketserver, ssl, sys, threading, urllib.parse

tmp, docker_sock = sys.argv[1], sys.argv[2]
posts = open(os.path.join(tmp, "posts.jsonl"), "a", buffering=1)

class Master(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def reply(self, code, body, ctype="text/plain"):
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def do_GET(self):
        self.reply(200, "dm-agent-smoke-ok\n") if self.path == "/smoke" else self.reply(404, "no\n")
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        posts.write(json.dumps({"path": self.path, "auth": self.headers.get("X-Auth-Node"),
                                "agent": self.headers.get("User-Agent"),
                                "body": json.loads(body or b"null")}) + "\n")
        self.reply(200, "{}", "application/json")

CONTAINERS = [
    {"Id": "4970ae" + "0" * 58, "Names": ["/web1"], "Image": "nginx:1.25",
     "Labels": {"app": "web"}, "State": "running"},
    {"Id": "5a1b2c" + "0" * 58, "Names": ["/smoke-node/db1"], "Image": "postgres:16",
     "Labels": None, "State": "exited"},
]
INFO = {"Name": "smoke-node", "ID": "SMOKE", "Labels": ["zone=eu=1", "bare"],
        "ServerVersion": "24.0.0", "Containers": 2}
VERSION = {"ApiVersion": "1.43", "MinAPIVersion": "1.12", "Version": "24.0.0",
           "Os": "linux", "Arch": "amd64"}

class Docker(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def address_string(self): return "unix"
    def reply(self, code, obj):
        data = (obj if isinstance(obj, str) else json.dumps(obj)).encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain" if isinstance(obj, str) else "application/json")
        self.send_header("Api-Version", "1.43")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def do_HEAD(self): self.do_GET()
    def do_GET(self):
        path = urllib.parse.urlsplit(self.path).path
        parts = path.split("/")
        if len(parts) > 2 and parts[1].startswith("v1."):
            path = "/" + "/".join(parts[2:])
        if path == "/_ping":
            self.reply(200, "OK")
        elif path == "/version":
            self.reply(200, VERSION)
        elif path == "/info":
            self.reply(200, INFO)
        elif path == "/containers/json":
            self.reply(200, CONTAINERS)
        else:
            self.reply(404, {"message": f"smoke: no {path}"})

class UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    def get_request(self):
        conn, _ = super().get_request()
        return conn, ("unix", 0)

ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(os.path.join(tmp, "srv.pem"), os.path.join(tmp, "srv.key"))
master = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Master)
master.socket = ctx.wrap_socket(master.socket, server_side=True)
if os.path.exists(docker_sock):
    os.unlink(docker_sock)
docker = UnixServer(docker_sock, Docker)
threading.Thread(target=docker.serve_forever, daemon=True).start()
with open(os.path.join(tmp, "port.tmp"), "w") as fh:
    fh.write(str(master.server_address[1]))
os.rename(os.path.join(tmp, "port.tmp"), os.path.join(tmp, "port"))
master.serve_forever()
PY
: >"$TMP/posts.jsonl"
python3 "$TMP/servers.py" "$TMP" "$BARE/run/dm-smoke/docker.sock" 2>"$TMP/servers.log" &
PIDS+=($!)
for _ in $(seq 100); do [[ -s $TMP/port ]] && break; sleep 0.1; done
[[ -s $TMP/port ]] || { cat "$TMP/servers.log" >&2; die "smoke servers did not start"; }
PORT=$(cat "$TMP/port")
log "servers: https master on 127.0.0.1:$PORT, fake Docker Engine on /run/dm-smoke/docker.sock"

# 4. the throwaway smoke program: Docker SDK, https, OpenSSL, psutil in the frozen runtime
in_bare "/opt/dm-smoke/dm-agent-smoke/dm-agent-smoke --docker-sock /run/dm-smoke/docker.sock \
  --https-url https://127.0.0.1:$PORT/smoke --ca /opt/dm-smoke/ca.pem" ||
  die "the frozen smoke program failed (above)"
log "ok: frozen smoke program"

# 5. the product against the same servers
cat >"$BARE/opt/dm-smoke/dm-agent.ini" <<EOF
[main]
docker = unix:///run/dm-smoke/docker.sock
master = https://127.0.0.1:$PORT
master_ca = /opt/dm-smoke/ca.pem
secret = smoke-secret
timeout = 5
address = 10.0.0.1:2375
pidfile = /run/dm-smoke/agent.pid
jitter = no
EOF
chmod 600 "$BARE/opt/dm-smoke/dm-agent.ini"
CONF=/opt/dm-smoke/dm-agent.ini
posts() { wc -l <"$TMP/posts.jsonl"; }

out=$(in_bare "cd /tmp && dm-agent -f $CONF --check-config" 2>&1) ||
  { echo "$out" >&2; die "dm-agent --check-config failed"; }
[[ $out != *smoke-secret* ]] || die "--check-config printed the secret"
log "ok: dm-agent --check-config"

in_bare "cd /tmp && dm-agent -f $CONF --once --dry-run" >"$TMP/dry.json" 2>"$TMP/dry.err" ||
  { cat "$TMP/dry.err" >&2; die "dm-agent --once --dry-run failed"; }
python3 - "$TMP/dry.json" <<'PY' || die "the dry-run payload is not what the fake engine holds"
import json, sys
p = json.load(open(sys.argv[1]))
assert p["name"] == p["id"] == "smoke-node", p
assert [c["name"] for c in p["containers"]] == ["web1", "db1"], p["containers"]
assert p["labels"] == {"zone": "eu=1", "bare": ""}, p["labels"]
assert p["system"]["memory"]["total"] > 0 and 0.0 <= p["system"]["cpuLoad"] <= 100.0
print(f"  payload: {p['name']}, containers {[c['name'] for c in p['containers']]}, "
      f"cpuLoad {p['system']['cpuLoad']}, disks {sorted(p['system']['disks'])}")
PY
log "ok: dm-agent --once --dry-run (payload from the fake Docker Engine, psutil figures)"

n=$(posts)
in_bare "cd /tmp && dm-agent -f $CONF --once" 2>"$TMP/once.err" ||
  { cat "$TMP/once.err" >&2; die "dm-agent --once to the https master failed"; }
in_bare "cd /tmp && dm-agent -f $CONF -s argv-secret --once" 2>"$TMP/once2.err" ||
  { cat "$TMP/once2.err" >&2; die "dm-agent -s SECRET --once (re-exec) failed"; }
python3 - "$TMP/posts.jsonl" "$n" "$VERSION" <<'PY' || die "the master did not get the registrations"
import json, sys
posts = [json.loads(l) for l in open(sys.argv[1])][int(sys.argv[2]):]
assert len(posts) == 2, posts
assert posts[0]["path"] == "/discovery/nodes/smoke-node?ttl=10", posts[0]["path"]
assert posts[0]["auth"] == "smoke-secret" and posts[1]["auth"] == "argv-secret", posts
assert posts[0]["agent"] == f"dm-agent/{sys.argv[3]}", posts[0]["agent"]
assert posts[0]["body"]["address"] == "10.0.0.1:2375", posts[0]["body"]
PY
log "ok: dm-agent --once over https (master_ca), and -s SECRET through the frozen re-exec"

n=$(posts)
in_bare "cd /tmp && dm-agent -f $CONF -t 1 --daemon" 2>"$TMP/daemon.err" ||
  { cat "$TMP/daemon.err" >&2; die "dm-agent --daemon did not start"; }
[[ -s $BARE/run/dm-smoke/agent.pid ]] || die "--daemon exited 0 without a pidfile"
pid=$(cat "$BARE/run/dm-smoke/agent.pid")
for _ in $(seq 60); do (($(posts) >= n + 3)) && break; sleep 0.1; done
(($(posts) >= n + 3)) || die "the daemon (pid $pid) registered $(($(posts) - n)) times in 6 s, expected 3"
kill -0 "$pid" || die "the daemon is gone"
kill -TERM "$pid"
for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
! kill -0 "$pid" 2>/dev/null || die "the daemon did not stop within 3 s of SIGTERM"
[[ ! -e $BARE/run/dm-smoke/agent.pid ]] || die "the daemon left its pidfile behind"
log "ok: dm-agent --daemon: detached, registered every second, stopped on SIGTERM, pidfile removed"

log "PASS: the frozen dm-agent $VERSION works in a Debian 11 root without Python ($(($(date +%s) - T0))s)"
