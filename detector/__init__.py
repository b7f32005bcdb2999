"""Fast R-CNN, one concern per file: see README.md for the map."""
