"""How far the answers follow the reasoning, for runs trained with `rmo.think=readings`.

    python bench/results/demo_cpu/think_vs_answer.py EVAL_JSONL [EVAL_JSONL ...]

For each N: Kendall tau of the values written in `<think>Image i: v.</think>` against the truth (0 where the
reasoning does not read every image), and the share of answer items whose value equals the reading of the same
image in the reasoning. The figures of probes.md's seventh-session section come from it.
"""

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

from scipy.stats import kendalltau

from rarl_fast.rewards.parse import parse_responses

READING = re.compile(r"Image (\d+): (-?\d+(?:\.\d+)?)\.")


def readings(response: str) -> dict[int, float]:
    think = re.search(r"<think>(.*?)</think>", response, re.S)
    return {int(i): float(v) for i, v in READING.findall(think.group(1))} if think else {}


def answer_items(response: str) -> list[tuple[int, float]]:
    """(image id, value) of the answer's valid elements in listed order, by the reward's own parser."""
    parsed = parse_responses([response])
    return list(zip(parsed.ids[0][parsed.mask[0]].tolist(), parsed.values[0][parsed.mask[0]].tolist(), strict=True))


if __name__ == "__main__":
    for path in sys.argv[1:]:
        taus, same, items = defaultdict(list), defaultdict(int), defaultdict(int)
        for line in Path(path).read_text().splitlines():
            row = json.loads(line)
            n, read = row["n"], readings(row["response"])
            complete = sorted(read) == list(range(1, n + 1))
            if n >= 2:
                tau = kendalltau([read[i + 1] for i in range(n)], row["truth"]).statistic if complete else 0.0
                taus[n].append(0.0 if tau != tau else tau)
            for image_id, value in answer_items(row["response"]):
                items[n] += 1
                same[n] += read.get(image_id) == value
        for n in sorted(items):
            tau = f"reading tau {sum(taus[n]) / len(taus[n]):.3f}, " if taus[n] else ""
            print(f"{path} N={n}: {tau}answer value = reading {same[n] / items[n]:.2f} ({items[n]} items)")
