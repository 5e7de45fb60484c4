"""A unit range of a Llama checkpoint: checkpoint I/O, the stage module, split generation on one host (no devices, no plans)."""
