"""Subcommands of the ``effattn`` CLI, one module each (see ``efficient_attn.cli``)."""
