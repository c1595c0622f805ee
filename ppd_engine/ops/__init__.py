"""Custom ops of the `ppd` library: thin wrappers with shape checks, fake kernels and autograd."""
