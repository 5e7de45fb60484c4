"""Steps 2-3 of the method: the problem, the plan and its cost model, the exact DPs, schedules, baselines (pure: no torch, no sockets)."""
