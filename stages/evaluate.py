"""DVC stage `evaluate`: score every method of one (dataset, ratio, seed) group on every test set.

Same as `knowsam-bench evaluate ...`; kept as a file so dvc.yaml names its entry points.
"""

from _entry import run

if __name__ == "__main__":
    run("evaluate")
