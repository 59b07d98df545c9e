"""The subcommands of ``dm-agent`` (``dm-agent COMMAND``), each with its own parser, exit
codes and ``main(argv) -> int``: ``status``, ``migrate``, ``hash_password``
(``hash-password``), and ``parser``, the parser every command line uses."""
