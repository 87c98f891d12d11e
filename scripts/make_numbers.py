"""Write a sequence-to-sequence task offline and deterministically: numbers as digits -> the same numbers
in English words ("4071" -> "four thousand seventy-one"), as prompt/completion JSONL.

    python scripts/make_numbers.py                           # data/numbers/{train,test}.jsonl
    python scripts/make_numbers.py --out DIR --max 99999 --test 1000 --seed 1

The numbers 0..max are shuffled with the seed; the first --test of them go to test.jsonl, the rest to
train.jsonl, so no test number is ever trained on (training holds out its own val split from
train.jsonl). The words follow American usage without "and": 115 -> "one hundred fifteen".
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen"
).split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
SCALES = ((10**9, "billion"), (10**6, "million"), (1000, "thousand"))


def below_thousand(n: int) -> str:
    hundreds, rest = divmod(n, 100)
    words = [f"{ONES[hundreds]} hundred"] if hundreds else []
    if rest >= 20:
        tens, ones = divmod(rest, 10)
        words.append(TENS[tens] + (f"-{ONES[ones]}" if ones else ""))
    elif rest or not hundreds:
        words.append(ONES[rest])
    return " ".join(words)


def in_words(n: int) -> str:
    """0 <= n < 10**12 in English words."""
    if not 0 <= n < 10**12:
        raise ValueError(f"{n} is out of range [0, 10**12)")
    words = []
    for scale, name in SCALES:
        count, n = divmod(n, scale)
        if count:
            words.append(f"{below_thousand(count)} {name}")
    if n or not words:
        words.append(below_thousand(n))
    return " ".join(words)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/numbers", help="folder for train.jsonl and test.jsonl")
    parser.add_argument("--max", type=int, default=9999, help="the largest number (from 0)")
    parser.add_argument("--test", type=int, default=500, help="numbers held out in test.jsonl")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 0 < args.test < args.max or args.max >= 10**12:
        parser.error(f"need 0 < --test ({args.test}) < --max ({args.max}) < 10**12")
    numbers = list(range(args.max + 1))
    random.Random(args.seed).shuffle(numbers)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("test", numbers[: args.test]), ("train", numbers[args.test :])):
        lines = [json.dumps({"prompt": str(n), "completion": in_words(n)}) + "\n" for n in part]
        tmp = out / f"{name}.jsonl.tmp"
        tmp.write_text("".join(lines))
        tmp.replace(out / f"{name}.jsonl")  # a complete file or none
        print(f"{out / f'{name}.jsonl'}: {len(lines)} pairs")


if __name__ == "__main__":
    main()
