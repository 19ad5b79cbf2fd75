"""Research: sweeps over a config, the ahead-of-time memory planner and run reports."""
