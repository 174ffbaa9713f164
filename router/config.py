"""The router tier's configuration (one per Serve application)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from workers.events import ACTOR_NAMESPACE

# The cluster manager lives in this Ray namespace, so routers (in Serve's namespace)
# and the yard command (in its own) find it by name.
MANAGER_NAMESPACE = ACTOR_NAMESPACE

POLICIES = ("round_robin", "power_of_two", "least_load", "prefix_aware", "session_affinity", "flood")


@dataclass(frozen=True)
class RouterConfig:
    model: str = "tiny-llama"  # the directory or preset the workers serve (tokenizer, limits)
    served_model_name: Optional[str] = None  # the name clients send; default: `model`
    cluster_name: str = "yard"  # finds the cluster manager actor yard-manager-<name>
    policy: str = "least_load"
    policy_options: dict[str, Any] = field(default_factory=dict)
    snapshot_interval_s: float = 0.1  # how often a replica pulls the manager's snapshot
    max_queue_per_worker: int = 64  # above this on every worker, new requests get 429
    retry_after_s: int = 1
    max_attempts: int = 3  # workers one request may try before it fails
    # A request whose worker died with no other left waits this long for the cluster to
    # start a replacement, then resumes there (0: it fails at once with 503).
    failover_wait_s: float = 30.0
    # Prefill/decode pools: a prompt with at most this many tokens not in a decode
    # worker's prefix cache goes straight there, skipping the prefill hop (0: off).
    decider_max_uncached_tokens: int = 0
    block_size: int = 16  # the workers' KV block size: prefix hashes must match theirs
    # Who may call, and what a request may ask (router/auth.py, router/limits.py).
    api_keys_file: Optional[str] = None  # one key per line, then its grants ("priority")
    api_keys_env: str = "YARD_API_KEYS"  # keys, comma-separated (a Kubernetes Secret)
    allow_priority: bool = False  # may every caller set a request's priority (it preempts others)?
    max_body_bytes: int = 8 * 2**20
    max_prompt_tokens: Optional[int] = None  # per request; None: only max_model_len
    max_completion_tokens: Optional[int] = None  # per request; a default max_tokens is capped to it

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {list(POLICIES)}, got {self.policy!r}")
        for name in ("max_queue_per_worker", "retry_after_s", "max_attempts", "block_size", "max_body_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("max_prompt_tokens", "max_completion_tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1 or null, got {value!r}")
        value = self.decider_max_uncached_tokens
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"decider_max_uncached_tokens must be an integer >= 0, got {value!r}")
        if not self.snapshot_interval_s > 0:
            raise ValueError(f"snapshot_interval_s must be > 0, got {self.snapshot_interval_s!r}")
        if isinstance(self.failover_wait_s, bool) or not isinstance(self.failover_wait_s, (int, float)) \
                or not self.failover_wait_s >= 0:
            raise ValueError(f"failover_wait_s must be a number >= 0, got {self.failover_wait_s!r}")

    def policy_arguments(self) -> dict[str, Any]:
        """The policy's options; prefix-aware dispatch hashes with the workers' block size."""
        options = dict(self.policy_options)
        if self.policy == "prefix_aware" or options.get("fallback") == "prefix_aware":
            options.setdefault("block_size", self.block_size)
            options.setdefault("imbalance_guard", 8)
        return options

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model

    @property
    def manager_actor_name(self) -> str:
        return f"yard-manager-{self.cluster_name}"
