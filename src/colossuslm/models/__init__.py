"""Model code: plain PyTorch, free of parallelism (parallel/ applies it from outside).

Import submodules directly; this package stays import-light so the planner starts fast.
"""
