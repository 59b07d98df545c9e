"""The tunnel as one of the agent's services (docs/design.md §8): built from the settings,
run in a thread of its own with asyncssh's event loop, reloaded with the settings, and
described for ``dm-agent status``.

It never delays a registration: the rounds go straight to the master, and nothing here
is waited for but its own thread at a stop (at most ``STOP_WAIT``).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..config.relay import Listen, Relay, decode_host_key, split_listen, split_tunnel
from ..config.settings import Settings

if TYPE_CHECKING:
    import asyncio

log = logging.getLogger("dm_agent")

#: Backoff between attempts: the first within ``BACKOFF_FIRST`` s, each next bound
#: doubled, up to ``BACKOFF_CAP`` (``BACKOFF_CAP_PERMANENT`` for a refused key or a
#: wrong host key, which only the relay's or the node's operator can cure), each
#: delay drawn at random below its bound ("full jitter"), so that a relay that
#: restarts is not met by all its nodes at once (sshd's MaxStartups).
BACKOFF_FIRST = 2.0
BACKOFF_CAP = 15.0
BACKOFF_CAP_PERMANENT = 60.0
#: Seconds a stop waits for the thread (the agent stops within 2 s).
STOP_WAIT = 1.0
#: The settings the tunnel is made of: a reload that changes one reconnects.
FIELDS = ("tunnel", "tunnel_listen", "tunnel_host_key", "tunnel_key", "gateway")

#: The keys of the tunnel's settings; the others it reads are the gateway's.
KEYS = FIELDS[:4]


def backoff(attempt: int, permanent: bool, rand: Callable[[float, float], float]) -> float:
    """Seconds before attempt ``attempt + 1`` (0 is the first retry)."""
    cap = BACKOFF_CAP_PERMANENT if permanent else BACKOFF_CAP
    bound = min(cap, BACKOFF_FIRST * 2 ** min(attempt, 16))
    return rand(0.2, max(0.2, bound))


def _inline_executor() -> Any:
    """An executor that runs what it is given at once, in the tunnel's own thread.

    asyncssh builds its connection options in the loop's default executor at every
    connect (and resolves the relay's name there): with asyncio's own, that is a second
    thread that stays, with its stack and malloc arena, for a few milliseconds of work.
    A name that takes long to resolve then holds the tunnel's loop, and only it."""
    from concurrent.futures import Future, ThreadPoolExecutor

    class Inline(ThreadPoolExecutor):
        def submit(self, fn: Callable[..., Any], /, *args: Any,
                   **kwargs: Any) -> Future[Any]:
            done: Future[Any] = Future()
            try:
                done.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # handed to the awaiting coroutine
                done.set_exception(exc)
            return done

    return Inline(max_workers=1)


def forward_target(gateway: str) -> tuple[str, int]:
    """Where the relay's connections go on this node: the gateway's listen address, its
    loopback twin when it listens on every address."""
    host, _, port = gateway.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return host, int(port)


class Tunnel:
    """The tunnel service: start, reload, stop, and its status snapshot."""

    name = "tunnel"

    def __init__(self, settings: Settings, state_dir: Callable[[], str],
                 rand: Callable[[float, float], float] = random.uniform) -> None:
        self.settings = settings
        self._state_dir = state_dir
        self._rand = rand
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._kick: asyncio.Event | None = None
        self._halt = threading.Event()
        self._snap: dict[str, Any] = {"state": "off"}
        self._said: set[str] = set()

    # --- the service

    def start(self) -> None:
        s = self.settings
        if not s.tunnel or not s.tunnel_listen or not s.tunnel_host_key or not s.gateway:
            self._set(state="off")
            return
        relay, listen = split_tunnel(s.tunnel), split_listen(s.tunnel_listen)
        self._halt.clear()
        target = forward_target(s.gateway)
        self._set(state="connecting", since=time.time(), relay=str(relay), listen=str(listen),
                  forward_to=f"{target[0]}:{target[1]}", error=None, attempts=0,
                  key=s.tunnel_key, up_since=None,
                  host_key=decode_host_key(s.tunnel_host_key).fingerprint)
        self._thread = threading.Thread(target=self._run, args=(relay, listen), name="tunnel",
                                        daemon=True)
        self._thread.start()

    def reload(self, settings: Settings) -> None:
        old, self.settings = self.settings, settings
        if all(getattr(old, f) == getattr(settings, f) for f in FIELDS) and (
                self._thread is not None or not settings.tunnel):
            self._try_now()
            return
        self.stop()
        if settings.tunnel:
            log.info("tunnel: reconnecting with the new settings")
        self.start()

    def stop(self) -> None:
        self._halt.set()
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None:
            try:
                loop.call_soon_threadsafe(stopping.set)
            except RuntimeError:  # the loop has closed already
                pass
        if self._thread is not None:
            self._thread.join(STOP_WAIT)
            self._thread = None
        if self._snap.get("state") == "up":
            log.info("tunnel: closed")
        self._set(state="off", up_since=None)

    def _try_now(self) -> None:
        """A reload while the tunnel is down tries again at once, from the shortest wait:
        the operator has just changed something (the relay's table, its sshd)."""
        loop, kick = self._loop, self._kick
        if loop is not None and kick is not None and self._snap.get("state") == "down":
            try:
                loop.call_soon_threadsafe(kick.set)
            except RuntimeError:
                pass

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._snap)

    # --- the thread

    def _set(self, **values: Any) -> None:
        with self._lock:
            self._snap.update(values)

    def _run(self, relay: Relay, listen: Listen) -> None:
        import asyncio

        loop = asyncio.new_event_loop()
        loop.set_default_executor(_inline_executor())
        try:
            stopping, kick = asyncio.Event(), asyncio.Event()
            self._stopping, self._kick, self._loop = stopping, kick, loop
            if self._halt.is_set():  # stopped before the loop could be told
                return
            loop.run_until_complete(self._keep(relay, listen, stopping, kick))
        except Exception as exc:  # never out of the thread: say it, stay down
            log.error("tunnel: stopped on an unexpected %s: %s", type(exc).__name__, exc)
            log.debug("the failure's traceback:", exc_info=True)
            self._set(state="down", error=f"{type(exc).__name__}: {exc}")
        finally:
            if self._loop is loop:  # not a newer thread's, after a reload's short wait
                self._loop = None
            loop.close()

    async def _keep(self, relay: Relay, listen: Listen, stopping: asyncio.Event,
                    kick: asyncio.Event) -> None:
        """Connect, hold, and on any end try again after a jittered backoff."""
        import asyncio

        from .keys import node_key
        from .session import TunnelError, connect_and_forward

        s = self.settings
        assert s.tunnel_host_key and s.gateway
        host_key = decode_host_key(s.tunnel_host_key)
        target = forward_target(s.gateway)
        attempt = 0
        while not stopping.is_set():
            permanent = False
            try:
                key = node_key(s.tunnel_key, self._state_dir())
                if key.created:
                    log.warning("tunnel: made this node's key %s; the relay must know it "
                                "before the tunnel can come up: its authorized_keys line is "
                                "printed by dm-agent tunnel-key", key.path)
                self._set(key=key.path)
                # raced with the stop: a relay that accepts and then says nothing holds the
                # login up to its timeouts, and a stop must not wait for those
                held = asyncio.ensure_future(connect_and_forward(
                    relay, listen, host_key, key.path, target,
                    lambda: self._up(relay, listen), stopping))
                stop = asyncio.ensure_future(stopping.wait())
                await asyncio.wait({held, stop}, return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                if stopping.is_set():
                    held.cancel()
                    await asyncio.wait({held}, timeout=STOP_WAIT / 2)
                    return
                held.result()
            except TunnelError as exc:
                permanent = exc.permanent
                self._down(exc.kind, str(exc), attempt)
            except (OSError, ValueError) as exc:  # the key: unreadable, not a key
                permanent = True
                self._down("key", f"cannot use the node's key: {exc}", attempt)
            if self._snap.get("up_since") is not None:
                attempt = 0  # it was up: start again from the shortest wait
            self._set(up_since=None)
            delay = backoff(attempt, permanent, self._rand)
            attempt += 1
            self._set(attempts=attempt, retry_at=time.time() + delay)
            kick.clear()
            waits = {asyncio.ensure_future(stopping.wait()), asyncio.ensure_future(kick.wait())}
            _, pending = await asyncio.wait(waits, timeout=delay,
                                            return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            if kick.is_set() and not stopping.is_set():
                log.info("tunnel: trying again now (reload)")
                attempt = 0

    def _up(self, relay: Relay, listen: Listen) -> None:
        now = time.time()
        again = self._snap.get("error") is not None
        self._said.clear()
        self._set(state="up", since=now, up_since=now, error=None, attempts=0, retry_at=None)
        log.info("tunnel: %s through %s: the master reaches this node's gateway at https://%s",
                 "up again" if again else "up", relay, listen)

    def _down(self, kind: str, message: str, attempt: int) -> None:
        was_up = self._snap.get("state") == "up"
        changed = was_up or self._snap.get("state") != "down"
        self._set(state="down", error=message, **({"since": time.time()} if changed else {}))
        if kind in self._said:
            log.debug("tunnel: still down (attempt %d): %s", attempt + 1, message)
            return
        self._said.add(kind)
        log.error("tunnel: %s; trying again (registrations go on)", message)
