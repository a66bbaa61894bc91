"""DVC stage `evaluate`: score every method of one (dataset, ratio, seed) group on every test set.

Same as `knowsam-bench evaluate ...`; kept as a file so dvc.yaml names its entry points.
"""

import sys

from knowsam.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
