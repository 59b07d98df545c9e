"""The running process (docs/design.md §4): ``runner.serve`` wires the agent, its
``services``, the ``state`` file, the ``signals`` and the ``loop``, in the foreground
(``cli``) or detached (``daemon``, which holds the ``pidfile``). The loop asks the
``schedule`` when the next round is, runs it in a thread under its deadline (``rounds``),
applies a SIGHUP (``reload``) and pings systemd's watchdog (``notify``)."""
