"""Training and evaluation scripts of the embedded models (run as ``python -m training.<script>``)."""
