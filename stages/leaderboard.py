"""DVC stage `leaderboard`: Build the paper-style leaderboards from every evaluated run.

Same as `knowsam-bench leaderboard ...`; kept as a file so dvc.yaml names its entry points.
"""

from _entry import run

if __name__ == "__main__":
    run("leaderboard")
