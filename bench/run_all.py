"""`make bench`: run every benchmark in bench/ (each prints its own ratios).

Every ``bench_*.py`` is run, in name order: build, check, ci (a two-image ``imagekit ci``
pipeline cold vs warm, the shared cache's pull vs ``cp``), convert, upload. Give names to run
only some: ``python bench/run_all.py ci upload``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    scripts = sorted(p for p in HERE.glob("bench_*.py"))
    only = sys.argv[1:]
    failed = 0
    for script in scripts:
        if only and script.stem.removeprefix("bench_") not in only:
            continue
        print(f"\n=== {script.stem}", flush=True)
        rc = subprocess.run([sys.executable, str(script)], cwd=HERE.parent).returncode
        failed += rc != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
