"""How big is each step, and how much does each step change? Counted from the files, so the figures stay true.

Prints, as Markdown tables: the lines of every Python file of every step, and for each step against the previous
one the changed lines (`diff -u`: lines removed plus lines added) of each file they share or that is new.

    python scripts/step_stats.py
"""

from __future__ import annotations

import difflib
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def changed_lines(before: Path, after: Path) -> int:
    """Lines removed plus lines added by `diff -u before after` (Python's difflib where there is no diff)."""
    if shutil.which("diff"):
        diff = subprocess.run(["diff", "-u", before, after], capture_output=True, text=True).stdout.splitlines()
    else:
        old, new = before.read_text().splitlines(), after.read_text().splitlines()
        diff = list(difflib.unified_diff(old, new, lineterm="", n=0))
    return sum(1 for line in diff[2:] if line[:1] in "+-")


def main() -> None:
    """Print the two tables."""
    steps = sorted(p for p in REPO.glob("step_*") if p.is_dir())
    names = sorted({f.name for step in steps for f in step.glob("*.py")}, key=lambda n: (n != "train.py", n))
    lines = {(s.name, n): len((s / n).read_text().splitlines()) for s in steps for n in names if (s / n).exists()}
    print("Lines per file:\n")
    print("| file | " + " | ".join(s.name for s in steps) + " |")
    print("|---|" + "---:|" * len(steps))
    for name in names:
        print(f"| {name} | " + " | ".join(str(lines.get((s.name, name), "")) for s in steps) + " |")

    print("\nChanged lines against the previous step (`diff -u`, removed + added; new files: all their lines):\n")
    pairs = list(zip(steps, steps[1:], strict=False))
    print("| file | " + " | ".join(f"{a.name} → {b.name}" for a, b in pairs) + " |")
    print("|---|" + "---:|" * len(pairs))
    for name in names:
        cells = []
        for before, after in pairs:
            if not (after / name).exists():
                cells.append("")
                continue
            if not (before / name).exists():
                cells.append(f"{lines[(after.name, name)]} (new)")
                continue
            changed = changed_lines(before / name, after / name)
            cells.append(str(changed) if changed else "identical")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
