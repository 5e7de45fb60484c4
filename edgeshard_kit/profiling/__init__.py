"""Step 1 of the method: what each unit costs (measured profiles, the device catalog, roofline estimates, the paper's data)."""
