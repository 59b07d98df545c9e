"""``dm-agent tunnel-key``: this node's public key for the relay, and the relay's
``authorized_keys`` line for it (docs/tunnel.md). The key is made when it does not exist
yet, as the running agent would make it, so that the relay can learn it first."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from ..config import settings as config
from ..errors import EX_CONFIG, EX_OK, ConfigError
from .parser import Parser, parse_command

DESCRIPTION = """\
Print this node's public key for the tunnel's relay and the line to add to the relay's
authorized_keys (docs/tunnel.md). Without tunnel_key, the key is the agent's own ed25519
key in its state directory, made now if it does not exist yet (0600)."""

EPILOG = """\
Exit codes:
  0   printed
  78  configuration error (the config file, or tunnel_key that is not a usable key)
"""


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="dm-agent tunnel-key", description=DESCRIPTION, epilog=EPILOG,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-f", "--config", help="the agent's configuration file (default: the "
                   "search path, as the agent)")
    p.add_argument("--name", help="the comment that ends the authorized_keys line (default: "
                   "this host's name)")
    p.add_argument("--json", action="store_true", help="print one JSON object: key, public, "
                   "authorized_keys, created")
    return p


def main(argv: Sequence[str]) -> int:
    args = parse_command(parser(), argv)
    if isinstance(args, int):
        return args
    from ..gateway.service import state_directory
    from ..tunnel.keys import authorized_line, node_key

    try:
        settings, _ = config.load({}, args.config)
        key = node_key(settings.tunnel_key, state_directory())
    except ConfigError as exc:
        print(f"dm-agent tunnel-key: {exc}", file=sys.stderr)
        return EX_CONFIG
    except (OSError, ValueError) as exc:
        print(f"dm-agent tunnel-key: tunnel_key: {exc}", file=sys.stderr)
        return EX_CONFIG
    line = (authorized_line(key.public, settings.tunnel_listen, args.name)
            if settings.tunnel_listen else None)
    if args.json:
        print(json.dumps({"key": key.path, "public": key.public, "authorized_keys": line,
                          "created": key.created}))
        return EX_OK
    made = " (made now)" if key.created else ""
    print(f"# this node's key for the relay: {key.path}{made}")
    print(key.public)
    if line is None:
        print("# set tunnel_listen (the relay's ADDR:PORT for this node) for its "
              "authorized_keys line", file=sys.stderr)
        return EX_OK
    user = settings.tunnel.partition("@")[0] if settings.tunnel else "the relay's user"
    print(f"# its line in the relay's authorized_keys (of {user}):")
    print(line)
    return EX_OK
