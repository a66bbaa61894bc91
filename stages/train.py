"""DVC stage `train`: Train one (method, dataset, ratio, seed) cell of the matrix; resumes after a crash.

Same as `knowsam-bench train ...`; kept as a file so dvc.yaml names its entry points.
"""

from _entry import run

if __name__ == "__main__":
    run("train")
