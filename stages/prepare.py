"""DVC stage `prepare`: Turn data/raw/<dataset> into checked, memory-mappable arrays in data/prepared/<dataset>.

Same as `knowsam-bench prepare ...`; kept as a file so dvc.yaml names its entry points.
"""

from _entry import run

if __name__ == "__main__":
    run("prepare")
