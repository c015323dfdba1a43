"""JUnit XML, the test report every CI system renders: each check or gate a test case.

The layout is the one Jenkins' JUnit plugin reads, the common one of JUnit readers:
``<testsuites>`` holding one ``<testsuite>`` of ``<testcase>`` elements, a failed case with a
``<failure message="...">`` whose text holds the whole report.
"""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass


@dataclass
class Case:
    """One test case: passed when ``failure`` is None, else failed with that one-line message
    (and ``details``, every line, as the failure's text)."""

    name: str
    classname: str
    failure: str | None = None
    details: str = ""
    seconds: float = 0.0
    output: str = ""


def document(suite: str, cases: list[Case], seconds: float = 0.0) -> bytes:
    """The XML of one suite of ``cases``."""
    failures = sum(c.failure is not None for c in cases)
    counts = {"tests": str(len(cases)), "failures": str(failures), "errors": "0"}
    root = ET.Element("testsuites", {"name": suite, **counts, "time": f"{seconds:.3f}"})
    node = ET.SubElement(root, "testsuite", {
        "name": suite, **counts, "skipped": "0", "time": f"{seconds:.3f}",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S")})
    for case in cases:
        element = ET.SubElement(node, "testcase", {"classname": case.classname, "name": case.name,
                                                   "time": f"{case.seconds:.3f}"})
        if case.failure is not None:
            failure = ET.SubElement(element, "failure", {"message": case.failure, "type": "netbuild"})
            failure.text = case.details or case.failure
        if case.output:
            ET.SubElement(element, "system-out").text = case.output
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


def is_report(head: bytes) -> bool:
    """Whether a file beginning with ``head`` is a JUnit report (one netbuild may replace)."""
    text = head.lstrip()
    return text.startswith(b"<?xml") and b"<testsuites" in text or text.startswith(b"<testsuites")


def write(path, suite: str, cases: list[Case], seconds: float = 0.0) -> None:
    """Write the report to ``path`` atomically. A file there is replaced only when it is a JUnit
    report already (a CI job's previous run); anything else is refused with :class:`RunError`."""
    from pathlib import Path

    from ..errors import RunError
    from ..runs import atomic_write

    path = Path(path)
    try:
        if path.is_dir():
            raise RunError(f"{path}: is a folder; expected a file name for --junit")
        if path.exists():
            with open(path, "rb") as f:
                if not is_report(f.read(4096)):
                    raise RunError(f"{path}: exists and is not a JUnit report; expected a new file "
                                   "(or a report netbuild wrote, which it replaces)")
        if not path.parent.is_dir():
            raise RunError(f"{path}: the folder {path.parent} does not exist")
        atomic_write(path, document(suite, cases, seconds))
    except OSError as exc:
        raise RunError(f"{path}: cannot write: {exc.strerror or exc}") from None
