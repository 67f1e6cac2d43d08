"""Interactive annotation in the library: prompts, objects and 3D propagation (no Qt)."""
