"""kd2deploy: recipe-driven knowledge distillation and deployment for vision models."""

__version__ = "0.1.0"
