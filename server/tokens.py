"""Site tokens: the tokens file's format, its checks, and the table the daemon compares against.

A tokens file holds one ``site-id = token`` line per site; the token may be
the plaintext token (as the site holds it) or its hash, ``sha256:<64 hex>``
(what ``gdfed token SITE`` prints), so the file need not hold a usable
credential. Blank lines and lines whose first non-blank character is ``#``
are comments; a ``#`` anywhere else is refused, since it could be a comment
or part of a token and a silently truncated token is worse than an error.
A line may be quoted TOML (``site-a = "token"``) and a ``[table]`` line is
skipped, so a file of the older form still reads.

Every error names the file and line: a malformed line, an empty token, a
site named twice, two sites sharing a token (one would be locked out), a
site token equal to the admin token (one credential, both roles). The
daemon keeps only hashes (``SiteTokens``) and compares them in constant
time; ``SiteTokens.reload`` re-reads the files and swaps the table only if
the new one is valid, so a bad edit leaves the old tokens in force.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import stat
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from server.config import ConfigError
from server.records import check_id

logger = logging.getLogger(__name__)

HASH_PREFIX = "sha256:"
_HEX = re.compile(r"[0-9a-f]{64}")
_FIELD = "site_tokens_file"


def hashed(token: str) -> str:
    """The stored form of a plaintext token: ``sha256:<hex>``."""
    return HASH_PREFIX + hashlib.sha256(token.encode()).hexdigest()


def stored_form(value: str, where: str = "site token") -> str:
    """``value`` as stored: a ``sha256:`` hash as given (checked), a plaintext token hashed."""
    if value.startswith(HASH_PREFIX):
        digest = value[len(HASH_PREFIX) :]
        if not _HEX.fullmatch(digest):
            raise ConfigError(
                f"{where}: {value[:20]!r}… is not sha256: followed by 64 lowercase hex digits", field=_FIELD
            )
        return value
    return hashed(value)


def new_token() -> str:
    """A fresh random token: 256 bits, URL-safe (no '#', '=' or spaces)."""
    return secrets.token_urlsafe(32)


@dataclass(frozen=True, slots=True)
class TokenEntry:
    """One site's token as a file (or the config) gives it: stored form, and where it was read."""

    site: str
    digest: str  # sha256:<hex>
    where: str  # "FILE line N", for errors
    text: str = field(default="", repr=False)  # as written (plaintext or hash); "" once not needed


def parse_token_lines(text: str, source: str) -> list[TokenEntry]:
    """The entries of a tokens file's ``text`` (``source`` names it in errors); see the module docstring."""
    entries = []
    for number, raw in enumerate(text.splitlines(), 1):
        where = f"{source} line {number}"
        line = raw.strip()
        if not line or line.startswith("#") or (line.startswith("[") and line.endswith("]")):
            continue
        if "#" in line:
            raise ConfigError(
                f"{where}: '#' inside a line; comments go on their own line (a token may not hold '#')",
                field=_FIELD,
            )
        site, sep, token = (part.strip() for part in line.partition("="))
        site, token = _unquote(site), _unquote(token)
        if not sep or not site:
            raise ConfigError(f"{where}: {_shown(line)} is not `site = token`", field=_FIELD)
        if not token:
            raise ConfigError(f"{where}: site {site!r} has an empty token", field=_FIELD)
        try:
            check_id(site, "site id")
        except Exception as exc:  # InvalidArgument: same words, with the line
            raise ConfigError(f"{where}: {exc}", field=_FIELD) from None
        entries.append(TokenEntry(site, stored_form(token, where), where, token))
    return entries


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    return text


def _shown(line: str) -> str:
    """A malformed line for an error, without the secret it may hold."""
    site = line.partition("=")[0].strip()
    return repr(site[:40] + (" = …" if "=" in line else ""))


def read_token_file(path: Path, label: str = "", *, warn: bool = True) -> list[TokenEntry]:
    """The entries of the tokens file at ``path``; with ``warn``, a warning is logged if others may read it."""
    name = label or f"{_FIELD} {path}"
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        problem = "no such file" if isinstance(exc, FileNotFoundError) else f"cannot read it ({exc})"
        raise ConfigError(
            f"{name}: {problem}; it should hold `site-id = token` lines", field=_FIELD
        ) from None
    entries = parse_token_lines(text, name)  # an error first: it is what the operator must fix
    if warn and mode & 0o077:
        logger.warning(
            "[tokens] %s has mode %04o: others than its owner may read the site tokens; chmod 600 it",
            path,
            mode,
        )
    return entries


def check_entries(entries: Iterable[TokenEntry], admin_token: str = "") -> dict[str, str]:
    """site -> stored token, refusing a site named twice, a token shared, or one equal to the admin token."""
    admin = hashed(admin_token) if admin_token else ""
    sites: dict[str, TokenEntry] = {}
    owners: dict[str, TokenEntry] = {}
    for entry in entries:
        if entry.site in sites:
            raise ConfigError(
                f"{entry.where}: site {entry.site!r} already has a token ({sites[entry.site].where})",
                field=_FIELD,
            )
        if entry.digest in owners:
            other = owners[entry.digest]
            raise ConfigError(
                f"{entry.where}: site {entry.site!r} has the same token as site {other.site!r} "
                f"({other.where}); each site needs its own",
                field=_FIELD,
            )
        if admin and hmac.compare_digest(entry.digest, admin):
            raise ConfigError(
                f"{entry.where}: site {entry.site!r}'s token is the admin token; give the site its own",
                field=_FIELD,
            )
        sites[entry.site] = owners[entry.digest] = entry
    return {site: entry.digest for site, entry in sites.items()}


def inline_entries(tokens: Mapping[str, str], source: str = "site_tokens") -> list[TokenEntry]:
    """Tokens given as a mapping (the config's ``[sites]`` table, or code) as entries."""
    entries = []
    for site, token in tokens.items():
        where = f"{source}.{site}"
        if not str(token).strip():
            raise ConfigError(f"{where}: site {site!r} has an empty token", field="site_tokens")
        entries.append(TokenEntry(site, stored_form(str(token).strip(), where), where))
    return entries


@dataclass(frozen=True, slots=True)
class ReloadReport:
    """What a reload changed, by site id (never a token)."""

    sites: int
    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]

    def describe(self) -> str:
        parts = [f"{self.sites} site tokens in force"]
        for word, names in (("added", self.added), ("removed", self.removed), ("changed", self.changed)):
            if names:
                parts.append(f"{word}: {', '.join(names)}")
        return "; ".join(parts)


class SiteTokens:
    """The site tokens in force, as hashes; thread-safe, swapped whole by ``reload``.

    ``fixed`` are the tokens that do not come from a file (the config's ``[sites]``): they stay
    as they are until a restart. ``files`` are re-read by ``reload``.
    """

    def __init__(self, fixed: Mapping[str, str], files: Sequence[Path], admin_token: str) -> None:
        self._files = tuple(files)
        self._admin_token = admin_token
        self._lock = threading.Lock()
        self._reload_lock = threading.Lock()
        file_entries = self._read_files(warn=False)  # the config's loader warned at start
        # ``fixed`` may hold the files' tokens too (the config merges them): a site named in a file
        # is the file's, so that removing it there revokes it instead of falling back.
        from_files = {e.site for e in file_entries}
        self._fixed = [replace(e, text="") for e in inline_entries(fixed) if e.site not in from_files]
        self._table = check_entries([*self._fixed, *file_entries], admin_token)

    def _read_files(self, *, warn: bool = True) -> list[TokenEntry]:
        return [e for path in self._files for e in read_token_file(path, warn=warn)]

    def _read(self) -> dict[str, str]:
        return check_entries([*self._fixed, *self._read_files()], self._admin_token)

    @property
    def files(self) -> tuple[Path, ...]:
        return self._files

    def sites(self) -> list[str]:
        with self._lock:
            return sorted(self._table)

    def site_of(self, token: str) -> str | None:
        """The site whose token this is, or None; every stored hash is compared (constant time each)."""
        digest = hashed(token)
        with self._lock:
            table = self._table
        found = None
        for site, expected in table.items():
            if hmac.compare_digest(digest, expected):
                found = site
        return found

    def reload(self) -> ReloadReport:
        """Re-read the files; on any error the tokens in force stay and ConfigError names the line."""
        if not self._files:
            raise ConfigError(
                "no site tokens file is configured (site_tokens_file, --tokens): nothing to reload; "
                "tokens in the config's [sites] change only with a restart",
                field=_FIELD,
            )
        with self._reload_lock:
            new = self._read()
            with self._lock:
                old, self._table = self._table, new
        return ReloadReport(
            sites=len(new),
            added=tuple(sorted(set(new) - set(old))),
            removed=tuple(sorted(set(old) - set(new))),
            changed=tuple(sorted(s for s in set(old) & set(new) if old[s] != new[s])),
        )
