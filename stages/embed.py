"""DVC stage `embed`: cache the frozen SAM teacher encoder's embeddings of data/prepared/<dataset> (sam.encoder cached).

Same as `knowsam-bench embed ...`; kept as a file so dvc.yaml names its entry points.
"""

from _entry import run

if __name__ == "__main__":
    run("embed")
