"""Read mutmut's run log, print the mutation score, and fail below a minimum.

    python tests/mutation_score.py .mutmut.log --minimum 97

The survivors known to be equivalent (same behaviour) are listed in the
README's testing section.
"""

from __future__ import annotations

import argparse
import re
import sys


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("log")
    parser.add_argument("--minimum", type=float, required=True, help="lowest acceptable score, in percent")
    args = parser.parse_args()
    text = open(args.log, encoding="utf-8", errors="replace").read()
    runs = re.findall(r"(\d+)/(\d+)\s+🎉 (\d+) 🫥 (\d+)\s+⏰ (\d+)\s+🤔 (\d+)\s+🙁 (\d+)", text)
    if not runs:
        print("no mutmut progress line found", file=sys.stderr)
        return 1
    done, total, killed, no_tests, timeouts, suspicious, survived = map(int, runs[-1])
    if done != total:
        print(f"mutmut stopped at {done}/{total}", file=sys.stderr)
        return 1
    score = 100.0 * (killed + timeouts) / total
    print(
        f"mutation score: {killed + timeouts}/{total} killed ({score:.1f}%), {survived} survived, "
        f"{no_tests} without tests, {suspicious} suspicious"
    )
    return 0 if score >= args.minimum else 1


if __name__ == "__main__":
    sys.exit(main())
