"""kd2deploy: recipe-driven knowledge distillation and deployment for vision models."""

__version__ = "0.2.0"
