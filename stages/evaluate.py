"""DVC stage `evaluate`: Score one trained run on every test set of its dataset.

Same as `knowsam-bench evaluate ...`; kept as a file so dvc.yaml names its entry points.
"""

import sys

from knowsam.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
