"""Run kernel-test code under the Triton CPU interpreter in a fresh process.

TRITON_INTERPRET must be set before triton is first imported, and pytest has imported it already,
so each interpreted check runs as `python -c CODE`; CODE prints "OK" when its assertions hold.
"""

from __future__ import annotations

import os
import subprocess
import sys


def assert_passes_interpreted(code: str, timeout: int = 600) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]
