"""Training machinery shared by every algorithm: state, optimizer, the step factory, checkpoints, metrics, the loop."""
