"""Write paired (prompt -> completion) tasks offline and deterministically, as JSONL for data=pairs.

    python scripts/make_pairs.py numbers                 # data/numbers/{train,test}.jsonl
    python scripts/make_pairs.py numbers --max 99999 --test 1000 --seed 1
    python scripts/make_pairs.py dialogue                # data/dialogue/{train,test}.jsonl
    python scripts/make_pairs.py reverse                 # data/reverse/{train,test}.jsonl

numbers: numbers as digits -> the same numbers in English words ("4071" -> "four thousand
seventy-one"), American usage without "and". The numbers 0..max are shuffled with the seed; the
first --test go to test.jsonl, the rest to train.jsonl, so no test number is ever trained on
(training holds out its own val split from train.jsonl).

reverse: strings of 4 to --length lowercase letters, each paired with itself reversed ("stone" ->
"enots"): a task where every output token depends on one input token far from it, so the model must
read the whole source. --count distinct strings drawn with the seed; the first --test go to
test.jsonl.

dialogue: Tiny Shakespeare's speeches (blocks between blank lines, each opening with its speaker),
each as the prompt to the speech that answers it; pairs longer than --max-chars are left out. Pairs
from the last tenth of the play text go to test.jsonl: the part that character-level pretraining on
Tiny Shakespeare holds out for validation.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not
from gpt.data.sources import find_shakespeare  # noqa: E402
from gpt.errors import UserError  # noqa: E402

ONES = (  # noqa: SIM905
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen"
).split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()  # noqa: SIM905
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


def numbers(args: argparse.Namespace) -> dict[str, list[dict[str, str]]]:
    if not 0 < args.test < args.max < 10**12:
        raise ValueError(f"need 0 < --test ({args.test}) < --max ({args.max}) < 10**12")
    order = list(range(args.max + 1))
    random.Random(args.seed).shuffle(order)
    pairs = [{"prompt": str(n), "completion": in_words(n)} for n in order]
    return {"test": pairs[: args.test], "train": pairs[args.test :]}


def reverse(args: argparse.Namespace) -> dict[str, list[dict[str, str]]]:
    if not 4 <= args.length <= 64:
        raise ValueError(f"--length {args.length} must be in 4..64")
    if not 0 < args.test < args.count <= 100_000:
        raise ValueError(f"need 0 < --test ({args.test}) < --count ({args.count}) <= 100000")
    rng = random.Random(args.seed)
    drawn: dict[str, None] = {}  # distinct strings, in the order drawn
    while len(drawn) < args.count:
        drawn["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(4, args.length)))] = None
    pairs = [{"prompt": s, "completion": s[::-1]} for s in drawn]
    return {"test": pairs[: args.test], "train": pairs[args.test :]}


def dialogue(args: argparse.Namespace) -> dict[str, list[dict[str, str]]]:
    if args.text:
        path = Path(args.text)
        if not path.is_file():
            raise ValueError(f"--text {path} does not exist; pass the play's text file")
    else:  # where train.py finds (or downloads) it
        path = find_shakespeare(Path(os.environ.get("GPT_DATA_DIR") or "data"))
    speeches = [s.strip("\n") for s in path.read_text(encoding="utf-8").split("\n\n") if s.strip()]
    held_out = int(len(speeches) * 0.9)
    split: dict[str, list[dict[str, str]]] = {"test": [], "train": []}
    for i, (said, answer) in enumerate(zip(speeches, speeches[1:], strict=False)):
        if len(said) + len(answer) + 1 <= args.max_chars:
            split["test" if i >= held_out else "train"].append({"prompt": said, "completion": answer})
    return split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("task", choices=("numbers", "reverse", "dialogue"))
    parser.add_argument("--out", help="folder for train.jsonl and test.jsonl (default: data/TASK)")
    parser.add_argument("--max", type=int, default=9999, help="numbers: the largest number (from 0)")
    parser.add_argument(
        "--test", type=int, default=500, help="numbers, reverse: how many are held out in test.jsonl"
    )
    parser.add_argument("--seed", type=int, default=0, help="numbers, reverse: the seed of the draw")
    parser.add_argument("--count", type=int, default=10_000, help="reverse: how many strings in all")
    parser.add_argument("--length", type=int, default=16, help="reverse: the longest string")
    parser.add_argument(
        "--text", help="dialogue: the play (default: Tiny Shakespeare in $GPT_DATA_DIR or ./data, fetched)"
    )
    parser.add_argument("--max-chars", type=int, default=240, help="dialogue: the longest pair kept")
    args = parser.parse_args()
    try:
        splits = {"numbers": numbers, "reverse": reverse, "dialogue": dialogue}[args.task](args)
    except (ValueError, UserError) as e:
        print(f"make_pairs.py: {e}", file=sys.stderr)  # one line, exit 2, nothing written
        sys.exit(2)
    out = Path(args.out or f"data/{args.task}")
    out.mkdir(parents=True, exist_ok=True)
    for name, pairs in splits.items():
        tmp = out / f"{name}.jsonl.tmp"
        tmp.write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
        tmp.replace(out / f"{name}.jsonl")  # a complete file or none
        print(f"{out / f'{name}.jsonl'}: {len(pairs)} pairs")


if __name__ == "__main__":
    main()
