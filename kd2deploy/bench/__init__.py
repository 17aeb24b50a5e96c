"""Measuring deployables: `kd2deploy bench` (`run`, timing in `harness`, tables and plots in `report`) and
`kd2deploy eval` (`accuracy`), both on what `resolve` finds at a path. Torch-free except for PyTorch rows."""
