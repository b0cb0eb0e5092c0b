"""The scheduler: one process owning the delivery plan and every delivery outcome."""
