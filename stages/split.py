"""DVC stage `split`: Write the labeled/unlabeled/validation split of one (dataset, ratio, seed).

Same as `knowsam-bench split ...`; kept as a file so dvc.yaml names its entry points.
"""

from _entry import run

if __name__ == "__main__":
    run("split")
