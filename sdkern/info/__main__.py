"""``python -m sdkern.info [--json]``: print the build and runtime report."""

import json
import sys

from sdkern.info import info

if __name__ == "__main__":
    if "--json" in sys.argv[1:]:
        print(json.dumps(info(as_dict=True), indent=2))
    else:
        print(info())
