"""Kernel mode: the simulated devices served as VDUSE devices on a kernel's real vDPA bus."""
