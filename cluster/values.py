"""Deployment values layered over a Serve application's args.

A RayService's serveConfigV2 stays the same file everywhere (the e2e tests run it);
what changes per deployment (model, worker counts, tensor-parallel size, router
replicas) lives in a small YAML file of the same shape, named by the args'
`values_file` and merged over them: mappings key by key, anything else replaced.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def merge(base: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """`base` with `values` merged in (neither is changed)."""
    merged = dict(base)
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def with_values_file(args: dict[str, Any]) -> dict[str, Any]:
    """`args` without `values_file`, that file's values merged in."""
    args = dict(args)
    path = args.pop("values_file", None)
    if path is None:
        return args
    try:
        values = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"values_file {path!r} cannot be read: {e}") from e
    if values is None:
        return args
    if not isinstance(values, dict):
        raise ValueError(f"values_file {path!r} must hold a mapping, got {type(values).__name__}")
    return merge(args, values)
