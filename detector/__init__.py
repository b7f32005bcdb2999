"""Fast R-CNN, one concern per file: see README.md for the map.

`from detector import Detector` gives the trained-model API (detect.Detector); it is imported on first use, so
that importing a submodule stays cheap.
"""


def __getattr__(name: str):
    if name == "Detector":
        from detector.detect import Detector

        return Detector
    raise AttributeError(f"module 'detector' has no attribute {name!r}")
