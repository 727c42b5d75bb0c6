"""Hash every array of a results.npz, to show that a change left the numbers as they were.

    python scripts/npz_hashes.py out/results.npz > before.txt
    python scripts/npz_hashes.py out/results.npz --compare before.txt

Each line is ``name dtype shape sha256`` of the array's bytes (C order), so two runs
whose arrays are bit-for-bit equal print the same lines. The JSON header is hashed
without the entries that change from run to run (``created``, ``timings``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys

import numpy as np


def array_hashes(path: str) -> dict[str, str]:
    out = {}
    with np.load(path, allow_pickle=False) as data:
        for name in sorted(data.files):
            a = np.ascontiguousarray(data[name])
            if name == "header":  # the run's date and timings differ from run to run
                header = json.loads(str(data[name][()]))
                for key in ("created", "timings"):
                    header.pop(key, None)
                a = np.array(json.dumps(header, sort_keys=True))
            out[name] = f"{a.dtype} {a.shape} {hashlib.sha256(a.tobytes()).hexdigest()}"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("npz")
    parser.add_argument("--compare", help="a file this script printed before")
    args = parser.parse_args(argv)
    now = array_hashes(args.npz)
    if not args.compare:
        for name, h in now.items():
            print(name, h)
        return 0
    before = dict(line.split(" ", 1) for line in open(args.compare).read().splitlines())
    differ = sorted(n for n in set(now) | set(before) if now.get(n) != before.get(n))
    for name in differ:
        print(f"differs: {name}: {before.get(name)} -> {now.get(name)}")
    print(f"{len(now) - len(set(differ) & set(now))} of {len(now)} arrays identical")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
