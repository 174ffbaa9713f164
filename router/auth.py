"""API keys: who may call the service, and what each key may do.

Keys come from a file (`router.api_keys_file`: one key per line, then the grants it
has, `#` comments) and from an environment variable (`router.api_keys_env`,
default YARD_API_KEYS: keys separated by commas or new lines, no grants), which on
Kubernetes comes from a Secret. With no key anywhere the service is open, as
`vllm serve` is without --api-key. With keys, every request but the health check
must carry one: `Authorization: Bearer KEY` over HTTP, the same `authorization`
metadata over gRPC.

A grant lets a key do what the router's config does not allow everyone:
`priority` sets a request's priority (which preempts other requests).
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from router.openai_errors import FORBIDDEN, UNAUTHORIZED, APIError

GRANTS = ("priority",)


@dataclass(frozen=True)
class Caller:
    """What the caller of one request may do."""

    may_set_priority: bool


class ApiKeys:
    def __init__(self, grants: dict[str, frozenset[str]], allow_priority: bool = False) -> None:
        self._grants = grants
        self._allow_priority = allow_priority

    @classmethod
    def load(cls, file: Optional[str], env_var: str, allow_priority: bool = False) -> "ApiKeys":
        grants: dict[str, frozenset[str]] = {}
        for key in _split(os.environ.get(env_var, "")):
            grants[key] = frozenset()
        if file:
            grants.update(_read_file(Path(file)))
        return cls(grants, allow_priority)

    @property
    def required(self) -> bool:
        return bool(self._grants)

    def caller(self, authorization: Optional[str]) -> Caller:
        """The caller behind an Authorization value ('Bearer KEY'); raises a 401
        APIError when keys are required and it names none of them."""
        if not self.required:
            return Caller(may_set_priority=self._allow_priority)
        key = _bearer(authorization)
        grants = None
        for known, known_grants in self._grants.items():  # every key compared, in constant time each
            if key is not None and hmac.compare_digest(known.encode(), key.encode()):
                grants = known_grants
        if grants is None:
            message = ("a valid API key is required: send it as 'Authorization: Bearer KEY'"
                       if key is None else "the API key is not valid")
            raise APIError(UNAUTHORIZED, message, None, "invalid_request_error", "invalid_api_key")
        return Caller(may_set_priority=self._allow_priority or "priority" in grants)


def check_priority(caller: Caller, priority: int) -> None:
    """Raises 403 if the request sets a priority the caller may not set."""
    if priority != 0 and not caller.may_set_priority:
        raise APIError(FORBIDDEN, f"priority: setting a priority ({priority}) is not allowed for this caller; "
                       f"the router's allow_priority or the key's 'priority' grant allows it",
                       "priority", "invalid_request_error", "priority_not_allowed")


def _bearer(authorization: Optional[str]) -> Optional[str]:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def _split(raw: str) -> list[str]:
    return [k.strip() for k in raw.replace(",", "\n").splitlines() if k.strip()]


def _read_file(path: Path) -> dict[str, frozenset[str]]:
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"api_keys_file {str(path)!r} cannot be read: {e}") from e
    grants: dict[str, frozenset[str]] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        unknown = sorted(set(words[1:]) - set(GRANTS))
        if unknown:
            raise ValueError(f"api_keys_file {str(path)!r} line {number}: unknown grants {unknown}; "
                             f"known: {list(GRANTS)}")
        grants[words[0]] = frozenset(words[1:])
    return grants
