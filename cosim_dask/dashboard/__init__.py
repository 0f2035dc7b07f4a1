"""The live training page: the publisher a run calls each step, the scheduler plugin and its
routes (publisher), the per-run history it serves (runs) and the page assets."""
