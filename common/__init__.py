"""The shared bottom layer: errors, files, photos and metrics that every package may import.

Nothing here imports from the project's other packages (docs/design.md, "Where things live").
"""
