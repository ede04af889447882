"""Print the shell commands of one README block marked ``<!-- ci:NAME -->`` (the next fenced code block).

Used by .ci/newcomer.sh (the install block and the main command) and checked by tests/build/test_readme.py
(.ci/run runs the main and test commands verbatim). Comment lines and trailing comments are dropped.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


def block(readme: str, name: str) -> list[str]:
    m = re.search(rf"<!-- ci:{re.escape(name)}\b[^\n]*?-->\s*```[a-z]*\n(.*?)```", readme, flags=re.S)
    if m is None:
        raise SystemExit(f"README.md has no block marked <!-- ci:{name} -->")
    lines = []
    for line in m.group(1).splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


if __name__ == "__main__":
    path, name = sys.argv[1], sys.argv[2]
    print("\n".join(block(Path(path).read_text(), name)))
