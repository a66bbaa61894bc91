"""DVC stage `split`: Write the labeled/unlabeled/validation split of one (dataset, ratio, seed).

Same as `knowsam-bench split ...`; kept as a file so dvc.yaml names its entry points.
"""

import sys

from knowsam.cli import main

if __name__ == "__main__":
    sys.exit(main(["split", *sys.argv[1:]]))
