"""The options (every flag checked once) and the memory planner."""
