"""Bias and robustness sets (`kd2deploy robustness make-sets`) and their evaluation (`kd2deploy robustness`)."""
