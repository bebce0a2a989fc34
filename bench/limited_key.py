"""
Write a keys file holding the bench's key with limits that never refuse
(rpm and max_streams far above any load), then run a command: so that the
proxy checks the limits on every request, as the bench measures.

    python bench/limited_key.py KEYS_FILE KEY COMMAND...
"""

from __future__ import annotations

import json
import os
import sys

from ollamaproxy.admission.keys import digest


def main(argv: list[str]) -> None:
    keys_file, key, *command = argv
    with open(keys_file, "w", encoding="utf-8") as f:
        json.dump({"keys": [{"name": "bench", "hash": "sha256:" + digest(key).hex(),
                             "rpm": 10**9, "max_streams": 10**6}]}, f)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
