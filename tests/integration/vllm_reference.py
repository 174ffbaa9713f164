"""vLLM's own offline `LLM.generate` on token-id prompts, in a process of its own
(vLLM binds its threads to cores and spawns workers: not in the test process).

    python tests/integration/vllm_reference.py MODEL_DIR REQUEST.json OUT.json

REQUEST.json: {"prompts": [[ids]...], "max_tokens": n or [n per prompt], "logprobs": k or
null}; greedy, ignore_eos. OUT.json: per prompt {"token_ids", "text", "logprobs"}.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def vllm_generate(model_dir: str, prompts: list, max_tokens: int | list[int], logprobs: int | None,
                  tmp: Path) -> list[dict]:
    """Run this script on `prompts` (token-id lists) and return its output. One vLLM
    start costs about 15 s here: a module asks once, with a max_tokens per prompt."""
    request, out = tmp / "request.json", tmp / "out.json"
    request.write_text(json.dumps({"prompts": [list(p) for p in prompts], "max_tokens": max_tokens,
                                   "logprobs": logprobs}))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, __file__, model_dir, str(request), str(out)], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    return json.loads(out.read_text())


def vllm_generate_soon(model_dir: str, prompts: list, max_tokens: int | list[int], logprobs: int | None,
                       tmp: Path) -> "Future[list[dict]]":
    """vllm_generate, started now in a thread: the reference computes while the test
    starts its workers, which are as slow to start as it is."""
    pool = ThreadPoolExecutor(1)
    future = pool.submit(vllm_generate, model_dir, prompts, max_tokens, logprobs, tmp)
    pool.shutdown(wait=False)
    return future


def same_text(ours: str, vllm_text: str) -> bool:
    """yard's text for a vLLM worker's tokens against vLLM's own. They differ in one
    place only: a character left incomplete when the output ends, which yard releases
    as U+FFFD (its text is the decode of the tokens, whichever engine made them) and
    vLLM's detokenizer drops."""
    return ours in (vllm_text, vllm_text + "\ufffd")


def main() -> None:
    model, request_file, out_file = sys.argv[1:4]
    request = json.loads(open(request_file).read())
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    from workers.models.config import checkpoint_dtype

    llm = LLM(model=model, dtype=checkpoint_dtype(model), enforce_eager=True, seed=0,
              kv_cache_memory_bytes=2**28)
    lengths = request["max_tokens"]
    if isinstance(lengths, int):
        lengths = [lengths] * len(request["prompts"])
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=request["logprobs"])
              for n in lengths]
    outputs = llm.generate([{"prompt_token_ids": p} for p in request["prompts"]], params, use_tqdm=False)
    result = []
    for o in outputs:
        c = o.outputs[0]
        logprobs = None if c.logprobs is None else [d[t].logprob for t, d in zip(c.token_ids, c.logprobs)]
        result.append({"token_ids": list(c.token_ids), "text": c.text, "logprobs": logprobs})
    with open(out_file, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
