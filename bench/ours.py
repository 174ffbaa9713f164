"""yard's own engine on the benchmark's workload, through the offline API.

`workers.LLM` is the same engine a worker actor runs, minus Ray. Its
`engine.stats()` (if present) says how long steps took and how much of that was the
model forward; everything else (scheduling, block tables, input preparation,
sampling, bookkeeping) is overhead the engine itself adds.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from pathlib import Path
from typing import Any, Optional


def run_ours(model_dir: Path, prompts: list[list[int]], output_len: int,
             warmup_prompts: int = 4, engine_kwargs: Optional[dict[str, Any]] = None
             ) -> dict[str, Any]:
    from workers import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=str(model_dir), dtype="float32", **(engine_kwargs or {}))
    load_s = time.perf_counter() - t0

    def sampling(n: int) -> Any:
        return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)

    warmup_s = 0.0
    if warmup_prompts > 0:
        start = time.perf_counter()
        llm.generate(prompts[:warmup_prompts], sampling(min(16, output_len)))
        warmup_s = time.perf_counter() - start
    engine = getattr(llm, "engine", None)
    stats_before = _stats(engine)

    start = time.perf_counter()
    outs = llm.generate(prompts, sampling(output_len))
    wall_s = time.perf_counter() - start

    stats_after = _stats(engine)
    token_ids = [list(o.token_ids) for o in outs]
    del llm, engine, outs
    gc.collect()
    extra: dict[str, Any] = {"engine_stats": stats_after,
                             "overhead": overhead_share(stats_before, stats_after)}
    steps = [(s or {}).get("num_steps") for s in (stats_before, stats_after)]
    if all(isinstance(n, int) for n in steps) and steps[1] > steps[0]:
        extra["steps"] = steps[1] - steps[0]
        extra["wall_per_step_s"] = wall_s / extra["steps"]
    return {
        "wall_s": wall_s,
        "load_s": load_s,
        "warmup_s": warmup_s,
        "token_ids": token_ids,
        "extra": extra,
    }


def _stats(engine: Any) -> Optional[dict[str, Any]]:
    """`engine.stats()` as a JSON-able dict, or None when there is none (yet).

    Numeric properties (e.g. a computed overhead_share) are kept alongside fields."""
    fn = getattr(engine, "stats", None)
    if not callable(fn):
        return None
    try:
        raw = fn()
    except Exception as e:  # the benchmark must not die on a diagnostics call
        return {"error": f"{type(e).__name__}: {e}"}
    plain = _plain(raw)
    if isinstance(plain, dict):
        for name, attr in vars(type(raw)).items():
            if isinstance(attr, property) and name not in plain:
                try:
                    value = getattr(raw, name)
                except Exception:
                    continue
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    plain[name] = value
    return plain


def _plain(x: Any) -> Any:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: _plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (int, float, str, bool)) or x is None:
        return x
    if hasattr(x, "__dict__"):
        return {k: _plain(v) for k, v in vars(x).items() if not k.startswith("_")}
    if hasattr(x, "item"):  # a 0-d tensor or numpy scalar
        try:
            return x.item()
        except Exception:
            pass
    return repr(x)


def _numbers(d: Optional[dict[str, Any]], prefix: str = "") -> dict[str, float]:
    """Flatten nested dicts to {'a.b': number}."""
    flat: dict[str, float] = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            flat[key] = float(v)
        elif isinstance(v, dict):
            flat.update(_numbers(v, key + "."))
    return flat


def overhead_share(before: Optional[dict[str, Any]],
                   after: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """Share of step time spent outside the model forward, from whatever stats give.

    Accepted, best first: a pair of cumulative keys that differ only in 'model' or
    'forward' vs 'step' (e.g. total_model_time_s / total_step_time_s), differenced
    against the snapshot taken after warm-up so the share covers exactly the timed
    run; a ready-made fraction (a key naming overhead and fraction/share/ratio); a
    pair of mean keys (e.g. mean_model_time_s / mean_step_time_s), which cover
    whatever window the engine averages over.
    """
    a = _numbers(after)
    if not a:
        return None
    b = _numbers(before)
    pairs = []
    for fkey in a:
        for word in ("forward", "model"):
            i = fkey.lower().find(word)
            if i >= 0:
                skey = fkey[:i] + "step" + fkey[i + len(word):]
                if skey in a:
                    pairs.append((fkey, skey))

    def share(fkey: str, skey: str, diff: bool) -> Optional[dict[str, Any]]:
        fwd, step = a[fkey], a[skey]
        if diff:
            fwd, step = fwd - b.get(fkey, 0.0), step - b.get(skey, 0.0)
        if step <= 0:
            return None
        return {"share": 1.0 - fwd / step, "source": f"1 - {fkey} / {skey}"
                + (" over the timed run" if diff else ""), "forward": fwd, "step": step}

    for fkey, skey in pairs:
        if any(w in fkey.lower() for w in ("total", "sum", "cum")):
            found = share(fkey, skey, diff=True)
            if found:
                return found
    for key, v in a.items():
        low = key.lower()
        if ("overhead" in low or "outside" in low or "non_forward" in low) and \
                any(w in low for w in ("fraction", "share", "ratio")):
            return {"share": v, "source": key}
    for fkey, skey in pairs:
        found = share(fkey, skey, diff=False)
        if found:
            return found
    return None
