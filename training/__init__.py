"""The learning loop: trajectories to GLPFT data, training, evaluation, the model registry."""
