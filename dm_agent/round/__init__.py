"""The round: one registration, from the parts one configuration builds (docs/design.md §1).

``agent.Agent.register`` reads the node (``source``: Docker, its event stream and outage),
the host's figures (``collectors.host``) and the address to announce (``address``), builds
the body (``payload``) and hands it to the ``sink``: printed for ``--dry-run``, else sent to
the master (``reporter``). ``outage`` keeps a failing source to one log line, ``nodename``
says whether the master accepts the node's name, and ``bounds`` holds every round's limits
and what it is doing."""
