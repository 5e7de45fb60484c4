"""The testbed: the inventory (devices, links), how to reach a device over SSH, the emulated testbed (netns, sshd)."""
