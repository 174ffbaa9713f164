"""A router replica's footprint: the memory and start time of what it imports and
loads (the Serve app, the gRPC ingress, the model's tokenizer), with the fast
tokenizer (workers/models/fast_tokenizer.py: tokenizers + jinja2) beside transformers'
(which imports torch: how replicas started before). Each side runs in a fresh process, a few
times in turn; the table gives the medians.

    python bench/router_footprint.py [--model tiny-llama] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Runs in the child: imports and the tokenizer load, timed; then its resident memory.
CHILD = """
import json, sys, time
start = time.perf_counter()
import router.app, router.grpc_ingress
from workers.models.tokenizer import load_hf_tokenizer, load_tokenizer
tok = (load_tokenizer if sys.argv[2] == "fast" else load_hf_tokenizer)(sys.argv[1])
tok.encode("warm up")
seconds = time.perf_counter() - start
rss = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:")) / 1024
print(json.dumps({"seconds": seconds, "rss_mib": rss, "torch": "torch" in sys.modules}))
"""


def measure(model_dir: str, side: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, model_dir, side], capture_output=True, text=True,
                         check=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    from workers.models.tiny import resolve_model

    model_dir = str(resolve_model(args.model))
    runs: dict[str, list[dict]] = {"transformers": [], "fast": []}
    for _ in range(args.runs):
        for side in runs:  # interleaved: a noisy moment hits both sides
            runs[side].append(measure(model_dir, side))
    medians = {side: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "rss_mib")}
               for side, rs in runs.items()}
    print(f"{'tokenizer':<14}{'start s':>9}{'RSS MiB':>10}  torch imported")
    for side, m in medians.items():
        print(f"{side:<14}{m['seconds']:>9.2f}{m['rss_mib']:>10.0f}  {runs[side][0]['torch']}")
    before, after = medians["transformers"], medians["fast"]
    print(f"fast / transformers: start {after['seconds'] / before['seconds']:.2f}x, "
          f"memory {after['rss_mib'] / before['rss_mib']:.2f}x ({before['rss_mib'] - after['rss_mib']:.0f} MiB less)")


if __name__ == "__main__":
    main()
