"""Ray Serve deployment, item index and the model registry."""
