"""Rerunning a kernel test file under Triton's interpreter in a fresh process.

Triton fixes interpreter mode when it is imported: if something imported it before a test file
could set TRITON_INTERPRET=1, that file's CPU kernel tests skip in-process and run this way instead.
"""

import os
import subprocess
import sys


def rerun_under_interpreter(test_file: str) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(test_file)))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(test_file)],
                          env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
