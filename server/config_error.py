"""``ConfigError``: a setting the daemon cannot run with (re-exported by ``server.config``).

It lives in a module of its own so that config sections kept outside
``server.config`` (``server.tree_config``) raise the same error without an
import cycle.
"""

from __future__ import annotations

from common.errors import FailedPrecondition

__all__ = ["ConfigError"]


class ConfigError(FailedPrecondition, ValueError):
    """A setting the daemon cannot run with; ``field`` names it (``section.name``).

    A ValueError, as the loader's errors always were, and a FailedPrecondition, as the
    Coordinator's checks of the same settings were, so callers of either keep working.
    """
