"""The gateway as one of the agent's services (docs/design.md §6): built from the settings,
reloaded with them, and described for ``dm-agent status``."""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..config.settings import Settings

if TYPE_CHECKING:
    from .server import Listener
    from .tls import CertInfo

log = logging.getLogger("dm_agent")

#: Seconds between attempts to listen while the address cannot be bound.
RETRY_BIND = 10.0


def state_directory(env: dict[str, str] | None = None) -> str:
    """Where the agent keeps what outlives a restart (the self-issued certificate):
    systemd's ``$STATE_DIRECTORY``, else /var/lib/dm-agent for root, else
    ``${XDG_STATE_HOME:-~/.local/state}/dm-agent``."""
    env = dict(os.environ) if env is None else env
    if env.get("STATE_DIRECTORY"):
        return env["STATE_DIRECTORY"].split(":")[0]
    if os.geteuid() == 0:
        return "/var/lib/dm-agent"
    base = env.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "dm-agent")


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


class Gateway:
    """The gateway service: start, reload (certificates, password, access, Docker
    endpoint; a new listen address rebinds), stop, and its status snapshot.

    ``announced()`` is the address the registrations announce now (the round's
    ``Announcer``): the self-issued certificate names its host, and a gateway that
    cannot listen says what the master is told meanwhile."""

    name = "gateway"

    def __init__(self, settings: Settings, announced: Callable[[], str]) -> None:
        self.settings = settings
        self.announced = announced
        self.listener: Listener | None = None
        self.cert: CertInfo | None = None
        self.cert_path: str | None = None
        self.self_issued = False
        self.error: str | None = None
        self._stop = threading.Event()
        self._retry: threading.Thread | None = None
        self._said_off = False

    # --- what one configuration builds

    def _certificate(self, s: Settings) -> tuple[str, str]:
        from . import tls

        if s.gateway_cert and s.gateway_key:
            self.cert = tls.load_pair(s.gateway_cert, s.gateway_key)
            self.self_issued = False
            return s.gateway_cert, s.gateway_key
        address = self.announced()
        host = address.partition("://")[2].rpartition(":")[0].strip("[]")
        names = [n for n in {host} if n]
        cert, key, self.cert = tls.issue_self_signed(
            os.path.join(state_directory(), "gateway"), socket.gethostname(), names)
        self.self_issued = True
        return cert, key

    def _parts(self, s: Settings) -> tuple[Any, Any, Any]:
        from . import auth, tls
        from .upstream import Upstream

        cert, key = self._certificate(s)
        self.cert_path = cert
        context = tls.server_context(cert, key, s.gateway_client_ca,
                                     require_client_cert=not s.gateway_password_hash)
        authenticator = auth.Authenticator(s.gateway_password_hash)
        upstream = Upstream.from_settings(s.docker, s.docker_tls_ca, s.docker_tls_cert,
                                          s.docker_tls_key)
        return context, authenticator, upstream

    # --- the service

    def start(self) -> None:
        s = self.settings
        if not s.gateway:
            self._say_off()
            return
        from .server import Listener

        context, authenticator, upstream = self._parts(s)
        self.listener = Listener(split_listen(s.gateway), context, authenticator, upstream,
                                 read_only=s.gateway_access == "read-only")
        self._stop.clear()
        if not self._listen():
            self._retry = threading.Thread(target=self._keep_trying, name="gateway-bind",
                                           daemon=True)
            self._retry.start()

    def _say_off(self) -> None:
        """A gateway that stays off for want of credentials (``gateway_optional``, the
        container image's default): said once, at ERROR, with what to add."""
        reason = self.settings.gateway_off_reason
        if reason and not self._said_off:
            self._said_off = True
            log.error("gateway: not started, so the master cannot manage this node's Docker: "
                      "%s (in the container image: -e DM_AGENT_GATEWAY_PASSWORD_HASH=... or a "
                      "mounted gateway_client_ca)", reason)

    def _listen(self) -> bool:
        listener = self.listener
        if listener is None:
            return True
        try:
            listener.start()
        except OSError as exc:
            message = f"cannot listen on {self.settings.gateway}: {exc.strerror or exc}"
            if message != self.error:
                log.error("gateway: %s; trying again every %gs (registrations go on, "
                          "announcing %s)", message, RETRY_BIND,
                          self.announced())
            self.error = message
            return False
        if self.error:
            log.info("gateway: listening on %s again", self.settings.gateway)
        self.error = None
        cert = self.cert
        log.info("gateway: listening on %s (%s access; certificate %s%s, expires %s)",
                 self.settings.gateway, self.settings.gateway_access,
                 cert.fingerprint if cert else "?", " self-issued" if self.self_issued else "",
                 _iso(cert.not_after) if cert else "?")
        return True

    def _keep_trying(self) -> None:
        while not self._stop.wait(RETRY_BIND):
            if self._listen():
                return

    def reload(self, settings: Settings) -> None:
        old, self.settings = self.settings, settings
        if not settings.gateway or old.gateway != settings.gateway or self.listener is None:
            self.stop()
            self.start()
            return
        context, authenticator, upstream = self._parts(settings)
        self.listener.reconfigure(context, authenticator, upstream,
                                  read_only=settings.gateway_access == "read-only")
        log.info("gateway: reloaded (certificate %s)", self.cert.fingerprint if self.cert else "?")

    def stop(self) -> None:
        self._stop.set()
        if self._retry is not None:
            self._retry.join(timeout=1.0)
            self._retry = None
        if self.listener is not None:
            self.listener.stop()
            self.listener = None

    def snapshot(self) -> dict[str, Any]:
        s = self.settings
        if not s.gateway:
            return {"listen": None, "off_reason": s.gateway_off_reason}
        cert = self.cert
        listener = self.listener
        out: dict[str, Any] = {
            "listen": s.gateway,
            "listening": self.error is None and listener is not None,
            "error": self.error,
            "access": s.gateway_access,
            "auth": {"password": bool(s.gateway_password_hash),
                     "client_ca": s.gateway_client_ca},
            "certificate": None if cert is None else {
                "path": self.cert_path, "self_issued": self.self_issued,
                "fingerprint": cert.fingerprint, "not_after": cert.not_after,
                "names": list(cert.names)},
        }
        if listener is not None:
            out.update(listener.snapshot())
            out["auth_failures"] = listener.authenticator.snapshot()
        return out


def _iso(when: float) -> str:
    import time

    return time.strftime("%Y-%m-%d", time.gmtime(when))
