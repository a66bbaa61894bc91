"""DVC stage `acquire`: Fetch one dataset into data/raw/<dataset> (offline mirror first, else the official sources).

Same as `knowsam-bench acquire ...`; kept as a file so dvc.yaml names its entry points.
"""

from _entry import run

if __name__ == "__main__":
    run("acquire")
