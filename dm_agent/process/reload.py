"""SIGHUP: re-read the configuration and apply it whole, or keep the running one."""

from __future__ import annotations

import logging
from collections.abc import Callable

from .. import logs
from ..config.settings import Settings
from ..errors import ConfigError
from ..round.agent import Agent
from .services import Services

log = logging.getLogger("dm_agent")


def apply(agent: Agent, load: Callable[[], Settings], services: Services) -> bool:
    """Build the new configuration's parts, swap them in, then close the old ones;
    True when the configuration changed. A broken configuration is logged and the
    running one kept, parts and all."""
    try:
        new = load()
        if not agent.dry_run:
            new.require_master()
    except ConfigError as exc:
        log.error("reload failed, keeping the running configuration: %s", exc)
        return False
    agent.swap(new).close()
    logs.set_level(new.log_level)
    services.reload(new)
    log.info("configuration reloaded from %s: interval %ds", new.config_file or "(no file)",
             new.interval)
    return True
