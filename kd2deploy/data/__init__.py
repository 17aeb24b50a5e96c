"""Datasets: the torch-free registry (`sources`) and val reader (`valset`), and the torch training side
(`loaders`, `resident`)."""
