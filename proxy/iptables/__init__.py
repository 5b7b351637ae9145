"""Migrating from iptables: DNAT port forwards to a cacheport port map, and back.

::

    iptables-save | iptables -t nat -S | "sudo iptables -t nat -A ..." lines
        --parse_rules()-->   ImportedListener...  +  Untranslated...   (parse.py, pure)
        --render_yaml()-->   annotated YAML port map                     (render.py, pure)
    Config --render_iptables()--> "iptables -t nat -A PREROUTING ..." lines (render.py, pure)

``model.py`` holds what passes between the two; ``command.py`` (``cmd_import``,
``cmd_export``, ``register``) does the file and terminal I/O. Only a nat-table PREROUTING
DNAT rule for one TCP port to one address is a port forward that a listener can take over.
Every other line comes back as an ``Untranslated`` with its reason, so the caller lists it:
nothing is dropped silently.
"""

from .command import EXIT_CONFIG, EXIT_OK, InputError, cmd_export, cmd_import, read_input, register
from .model import ImportedListener, SourceLine, Untranslated
from .parse import (
    GUESSED_PROTOCOLS,
    IP_FORWARD_NOT_NEEDED,
    SAVE_NOT_NEEDED,
    SNAT_NOT_NEEDED,
    parse_rules,
)
from .render import open_allow, render_iptables, render_yaml

__all__ = [
    "EXIT_CONFIG", "EXIT_OK", "GUESSED_PROTOCOLS", "IP_FORWARD_NOT_NEEDED", "SAVE_NOT_NEEDED",
    "SNAT_NOT_NEEDED", "ImportedListener", "InputError", "SourceLine", "Untranslated",
    "cmd_export", "cmd_import", "open_allow", "parse_rules", "read_input", "register",
    "render_iptables", "render_yaml",
]
