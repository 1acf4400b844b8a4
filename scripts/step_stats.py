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
    files = {(s, f.name): f for s in steps for f in [*s.glob("*.py"), *s.glob("support/*.py")]}  # on top or below
    names = sorted({n for _, n in files}, key=lambda n: (n != "train.py", n))
    lines = {(s.name, n): len(f.read_text().splitlines()) for (s, n), f in files.items()}
    print("Lines per file (a file of support/ in the last step that has it is named with support/):\n")
    print("| file | " + " | ".join(s.name for s in steps) + " |")
    print("|---|" + "---:|" * len(steps))
    for name in names:
        last = [files[(s, name)] for s in steps if (s, name) in files][-1]
        shown = f"support/{name}" if last.parent.name == "support" else name
        print(f"| {shown} | " + " | ".join(str(lines.get((s.name, name), "")) for s in steps) + " |")

    print("\nChanged lines against the previous step (`diff -u`, removed + added; new files: all their lines):\n")
    pairs = list(zip(steps, steps[1:], strict=False))
    print("| file | " + " | ".join(f"{a.name} → {b.name}" for a, b in pairs) + " |")
    print("|---|" + "---:|" * len(pairs))
    for name in names:
        cells = []
        for before, after in pairs:
            if (after, name) not in files:
                cells.append("")
                continue
            if (before, name) not in files:
                cells.append(f"{lines[(after.name, name)]} (new)")
                continue
            changed = changed_lines(files[(before, name)], files[(after, name)])
            cells.append(str(changed) if changed else "identical")
        print(f"| {name} | " + " | ".join(cells) + " |")  # a moved file is compared where each step keeps it


if __name__ == "__main__":
    main()
