"""``python -m knowsam`` is the same as ``knowsam-bench``."""

from knowsam.cli import console_main

console_main()
