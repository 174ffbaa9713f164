"""How long a router replica's event loop stalls while one request is tokenized:
inline (as the router did before issue 10) against on the router's tokenizing thread
(router/core.py `prepare`).

While the replica's loop streams other requests' tokens, a ticker on the loop wakes
every millisecond; the longest gap between two ticks is the stall every other
stream on the replica sees. Each arm tokenizes the same chat (a long system prompt
and history through the model's chat template) and the same plain prompt.

    python bench/tokenize_stall.py                       # tiny-llama's tokenizer
    python bench/tokenize_stall.py --model /path/to/model --tokens 32000

Prints a table of the worst stall per arm and the ratio; writes JSON to
bench/results/tokenize-stall-<timestamp>.json (or --json PATH).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from workers.models.tiny import resolve_model  # noqa: E402
from workers.models.tokenizer import encode_chat, encode_prompt, load_tokenizer  # noqa: E402

WORDS = ("cache", "block", "token", "request", "worker", "router", "prefill", "decode", "latency", "budget")


def long_text(num_words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(num_words))


async def worst_gap(work: Callable[[], Any], tick_s: float = 0.001) -> tuple[float, Any]:
    """Run `work` (a coroutine function) beside a 1 ms ticker; the longest gap in s."""
    done = asyncio.Event()
    worst = 0.0

    async def ticker() -> None:
        nonlocal worst
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(tick_s)
            now = time.perf_counter()
            worst = max(worst, now - last)
            last = now

    ticking = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    result = await work()
    done.set()
    await ticking
    return worst, result


async def measure(tokenize: Callable[[], list[int]], repeats: int) -> dict[str, Any]:
    thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tokenize")

    async def inline() -> list[int]:
        return tokenize()

    async def on_thread() -> list[int]:
        return await asyncio.get_running_loop().run_in_executor(thread, tokenize)

    arms: dict[str, list[float]] = {"inline": [], "thread": []}
    ids: list[int] = []
    for _ in range(repeats):  # interleaved, so that machine noise hits both alike
        for name, work in (("inline", inline), ("thread", on_thread)):
            gap, ids = await worst_gap(work)
            arms[name].append(gap)
    thread.shutdown()
    return {"tokens": len(ids), **{name: max(gaps) for name, gaps in arms.items()},
            **{f"{name}_median": sorted(gaps)[len(gaps) // 2] for name, gaps in arms.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--tokens", type=int, default=16000, help="about this many words in the long prompt")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    tokenizer = load_tokenizer(resolve_model(args.model))
    history = [{"role": "system", "content": long_text(args.tokens // 2, 1)}]
    history += [{"role": "user" if i % 2 == 0 else "assistant", "content": long_text(args.tokens // 20, i + 2)}
                for i in range(10)]
    cases = {"chat": lambda: encode_chat(tokenizer, history),
             "prompt": lambda: encode_prompt(tokenizer, long_text(args.tokens, 99))}
    results = {name: asyncio.run(measure(work, args.repeats)) for name, work in cases.items()}
    print(f"tokenizer of {args.model}; worst loop stall over {args.repeats} runs (median in brackets)")
    print(f"{'case':<8}{'tokens':>8}{'inline ms':>18}{'on thread ms':>18}{'inline/thread':>15}")
    for name, r in results.items():
        print(f"{name:<8}{r['tokens']:>8}{r['inline'] * 1e3:>10.1f} ({r['inline_median'] * 1e3:5.1f})"
              f"{r['thread'] * 1e3:>10.1f} ({r['thread_median'] * 1e3:5.1f}){r['inline'] / r['thread']:>15.1f}")
    out = args.json or BENCH / "results" / f"tokenize-stall-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "repeats": args.repeats, "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
