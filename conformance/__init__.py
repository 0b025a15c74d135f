"""Cross-backend conformance suite (issue 6).

``cases`` defines each problem once as NumPy data; ``backends`` poses it in PyTorch
(torchdiffeq), JAX (diffrax) and plain NumPy (the core kernels); ``test_conformance``
checks every case, solver, dtype and device against the host libraries, the exact
oracle and the other framework; ``scale_out`` holds the multi-process (DDP) and
multi-device (sharded JAX) programs the suite runs in subprocesses.
"""
