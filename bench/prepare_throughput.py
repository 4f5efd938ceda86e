"""`gigatrain prepare` throughput (MB/s) and peak memory on a large generated corpus.

The corpus is `--mb` megabytes of text: ordinary documents (files of about 10 KB of
words) plus one document that is a single line of `--line-mb` megabytes (no newline, as
in a minified file or a huge JSON line). `gigatrain prepare` runs on it in a child
process with the default BPE tokenizer; the benchmark reports the wall time, MB/s and
the child's peak resident memory.

    python bench/prepare_throughput.py [--mb 50] [--line-mb 20] [--tokenizer bpe] [--dir DIR]

The last line is `prepare: X MB in Y s = Z MB/s, peak RSS W MB`.
"""

from __future__ import annotations

import argparse
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the of and to in is for on that with as by at from this be are or an it not which we data model "
         "token train shard batch loss gradient memory tensor rank def return self import class value").split()


def words(rng: random.Random, chars: int) -> str:
    """About `chars` characters of space-separated words, numbers and punctuation."""
    parts, total = [], 0
    while total < chars:
        word = rng.choice(WORDS) if rng.random() < 0.9 else rng.choice([str(rng.randrange(10**6)), "{", "});", "=="])
        parts.append(word)
        total += len(word) + 1
    return " ".join(parts)


def write_corpus(folder: Path, mb: float, line_mb: float, seed: int = 0) -> int:
    """The corpus described above; returns its size in bytes."""
    rng = random.Random(seed)
    docs = folder / "docs"
    docs.mkdir(parents=True)
    with open(folder / "one_line.txt", "w") as line:  # written in slices: the generator's memory stays small
        for _ in range(max(1, round(line_mb * 10))):
            line.write(words(rng, 100_000) + " ")
    ordinary = int((mb - line_mb) * 1e6)
    for index in range(max(2, ordinary // 10_000)):
        lines = [words(rng, rng.randrange(20, 120)) for _ in range(120)]
        (docs / f"doc_{index:06d}.txt").write_text("\n".join(lines)[:10_000] + "\n")
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=50.0, help="corpus size in MB, the long line included")
    parser.add_argument("--line-mb", type=float, default=20.0, help="size of the single-line document in MB")
    parser.add_argument("--tokenizer", default="bpe")
    parser.add_argument("--dir", default=None, help="where to write the corpus and the data (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        corpus = Path(tmp) / "corpus"
        size = write_corpus(corpus, args.mb, args.line_mb)
        print(f"corpus: {size / 1e6:.1f} MB, one line of {args.line_mb:g} MB", flush=True)
        command = [sys.executable, "-m", "gigatrain", "prepare", str(corpus), "--out", str(Path(tmp) / "data"),
                   "--tokenizer", args.tokenizer]
        start = time.perf_counter()
        subprocess.run(command, check=True)
        seconds = time.perf_counter() - start
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
        print(f"prepare: {size / 1e6:.1f} MB in {seconds:.1f} s = {size / 1e6 / seconds:.2f} MB/s, peak RSS {peak_mb:.0f} MB")


if __name__ == "__main__":
    main()
