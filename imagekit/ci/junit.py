"""JUnit XML reports (what GitLab's ``artifacts:reports:junit``, GitHub test reporters and
Zuul's HTML show): one test suite per command, one test case per stage or check."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Case:
    name: str
    seconds: float = 0.0
    failure: str | None = None  # the failure's message; None: passed
    output: str = ""  # system-out (a console tail, a summary)
    skipped: str | None = None


def write(path: Path, suite: str, cases: list[Case]) -> Path:
    """Write the report (under a temporary name, then renamed); returns ``path``."""
    failures = sum(1 for c in cases if c.failure is not None)
    skipped = sum(1 for c in cases if c.skipped is not None and c.failure is None)
    total = round(sum(c.seconds for c in cases), 3)
    root = ET.Element("testsuites", name=suite, tests=str(len(cases)), failures=str(failures), time=str(total))
    ts = ET.SubElement(root, "testsuite", name=suite, tests=str(len(cases)), failures=str(failures),
                       errors="0", skipped=str(skipped), time=str(total))
    for c in cases:
        tc = ET.SubElement(ts, "testcase", classname=suite, name=c.name, time=str(round(c.seconds, 3)))
        if c.failure is not None:
            ET.SubElement(tc, "failure", message=c.failure[:500]).text = c.failure
        elif c.skipped is not None:
            ET.SubElement(tc, "skipped", message=c.skipped)
        if c.output:
            ET.SubElement(tc, "system-out").text = c.output
    ET.indent(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    try:
        ET.ElementTree(root).write(tmp, encoding="utf-8", xml_declaration=True)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
