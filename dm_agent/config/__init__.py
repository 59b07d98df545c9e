"""The configuration (docs/design.md §3, docs/configuration.md): ``settings``, the one table
of keys, the precedence rule and the effective ``Settings``; ``values``, the converters that
turn each key's text into its value."""
