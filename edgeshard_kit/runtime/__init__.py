"""Step 4 of the method: the wire and its protocol, worker launchers, the worker, the coordinator (chain, deployment), probes, calibration."""
