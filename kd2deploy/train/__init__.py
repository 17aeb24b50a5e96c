"""Training: the engine (one loop for plain training and every method, single process or torchrun), its speed
settings and timing, and the run's deployable student (`student`, which edge tools import without torch)."""
