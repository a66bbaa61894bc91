"""DVC stage `leaderboard`: Build the paper-style leaderboards from every evaluated run.

Same as `knowsam-bench leaderboard ...`; kept as a file so dvc.yaml names its entry points.
"""

import sys

from knowsam.cli import main

if __name__ == "__main__":
    sys.exit(main(["leaderboard", *sys.argv[1:]]))
