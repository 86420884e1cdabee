"""Report of ``make mutate``: the score per module and every mutant that was not killed.

Run from the repository root after ``mutmut run`` (which leaves its results in ``mutants/``):

    python tests/mutation_report.py [SCOPE_GLOB...] [--write docs/mutation-survivors.md]

A survivor is *accounted for* when docs/testing.md names it (its mutmut name, or a pattern with
``*`` for a group, with the reason beside it) or when it only changes the text of a message: a
string literal that is neither a documented finding code nor a property or format name (these are listed as "message text", by
name, in the written file). Every other survivor is printed with its diff and makes the exit
status 1: kill it with a test, or write down in docs/testing.md why it is equivalent or harmless.
"""

from __future__ import annotations

import argparse
import ast
import collections
import fnmatch
import io
import re
import sys
import tokenize
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KILLED = {"killed", "timeout", "caught by type check", "segfault"}


@dataclass
class Mutant:
    name: str
    status: str
    diff: str = ""
    kind: str = ""


def _codes() -> set[str]:
    sys.path.insert(0, str(ROOT))
    from imagekit.finding_codes import CODES  # noqa: PLC0415 - only when reporting

    return set(CODES)


def _strings(line: str) -> tuple[str, list[str]]:
    """The line with its string literals blanked, and the literals' values."""
    out: list[str] = []
    values: list[str] = []
    try:
        toks = list(tokenize.generate_tokens(io.StringIO(line.strip() + "\n").readline))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return line.strip(), []
    for t in toks:
        if t.type == tokenize.STRING:
            out.append('""')
            try:
                v = ast.literal_eval(t.string)
            except (ValueError, SyntaxError):
                v = t.string
            values.append(str(v))
        elif t.type in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER, tokenize.COMMENT):
            continue
        else:
            out.append(t.string)
    return " ".join(out), values


def _changed(diff: str) -> tuple[list[str], list[str]]:
    minus = [ln[1:] for ln in diff.splitlines() if ln.startswith("-") and not ln.startswith("---")]
    plus = [ln[1:] for ln in diff.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
    return minus, plus


def message_only(diff: str, protected: set[str]) -> bool:
    """True when the mutant changes only the text of string literals none of which is protected
    (a finding code, or a word that names something: lower-case identifiers such as properties)."""
    minus, plus = _changed(diff)
    if len(minus) != len(plus) or not minus:
        return False
    for a, b in zip(minus, plus, strict=True):
        sa, va = _strings(a)
        sb, vb = _strings(b)
        if sa != sb or len(va) != len(vb):
            return False
        for x, y in zip(va, vb, strict=True):
            if x == y:
                continue
            if x in protected or re.fullmatch(r"[a-z0-9_.:-]+", x):
                return False
    return True


def load(scope: list[str]) -> list[Mutant]:
    from mutmut.__main__ import SourceFileMutationData, walk_mutatable_files  # noqa: PLC0415
    from mutmut.stats import status_by_exit_code  # noqa: PLC0415

    found = []
    for path in walk_mutatable_files():
        m = SourceFileMutationData(path=path)
        m.load()
        for k, v in m.exit_code_by_key.items():
            if scope and not any(fnmatch.fnmatch(k, g) for g in scope):
                continue
            found.append(Mutant(k, status_by_exit_code[v]))
    return found


def _diff(name: str) -> str:
    from mutmut.mutation.diff_apply import get_diff_for_mutant  # noqa: PLC0415

    try:
        return get_diff_for_mutant(name)
    except Exception as exc:  # noqa: BLE001 - a report line, not a failure
        return f"(no diff: {exc})"


def module_of(name: str) -> str:
    return name.split(".x_")[0].split(".xǁ")[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("scope", nargs="*")
    ap.add_argument("--write", type=Path, help="write the list of accounted-for survivors here (markdown)")
    args = ap.parse_args(argv)
    mutants = load(args.scope)
    if not mutants:
        print("no mutants found: run `make mutate` first", file=sys.stderr)
        return 1
    documented = (ROOT / "docs" / "testing.md").read_text(encoding="utf-8")
    # a backticked name with a * documents a group of mutants (e.g. every mutant of one function)
    patterns = re.findall(r"`(imagekit\.[^`\s]*\*[^`\s]*)`", documented)
    protected = _codes()
    by_mod: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for m in mutants:
        by_mod[module_of(m.name)][m.status] += 1
        if m.status in KILLED or m.status in ("not checked", "skipped"):
            continue
        m.diff = _diff(m.name)
        if f"`{m.name}`" in documented or any(fnmatch.fnmatch(m.name, g) for g in patterns):
            m.kind = "documented"
        elif m.status == "survived" and message_only(m.diff, protected):
            m.kind = "message text"
        else:
            m.kind = "open"
    total = collections.Counter(m.status for m in mutants)
    print(f"{'module':44} {'mutants':>7} {'killed':>7} {'survived':>8} {'no tests':>8}  score")
    for mod in sorted(by_mod):
        print(_row(mod, by_mod[mod]))
    print(_row("all", total))
    kinds = collections.Counter(m.kind for m in mutants if m.kind)
    print(f"\nnot killed: {sum(kinds.values())} ({kinds['documented']} documented in docs/testing.md, "
          f"{kinds['message text']} change only message text, {kinds['open']} open)")
    for m in mutants:
        if m.kind == "open":
            print(f"\n## {m.name}: {m.status}\n{_short(m.diff)}")
    if args.write:
        _write(args.write, mutants, total)
    return 1 if kinds["open"] else 0


def _row(mod: str, c: collections.Counter[str]) -> str:
    n = sum(c.values())
    killed = sum(c[s] for s in KILLED)
    tested = n - c["not checked"] - c["skipped"]
    score = f"{100 * killed / tested:5.1f}%" if tested else "   - "
    return f"{mod:44} {n:7d} {killed:7d} {c['survived']:8d} {c['no tests']:8d}  {score}"


def _short(diff: str) -> str:
    return "\n".join(ln for ln in diff.splitlines() if ln[:1] in "-+" and ln[:3] not in ("---", "+++"))


def _write(path: Path, mutants: list[Mutant], total: collections.Counter[str]) -> None:
    lines = ["# Mutants that change only message text", "",
             "Written by `python tests/mutation_report.py --write docs/mutation-survivors.md` after `make mutate`",
             "(see docs/testing.md). Each mutant below survives because it changes only the wording of a message",
             "(an error, a finding's explanation, a hint), never a finding code, a property, a format name or a",
             "decision; tests assert codes and outcomes, not prose. Equivalent for safety.", ""]
    for m in mutants:
        if m.kind == "message text":
            minus, plus = _changed(m.diff)
            lines.append(f"- `{m.name}`: `{minus[0].strip()[:90]}` → `{plus[0].strip()[:90]}`")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
