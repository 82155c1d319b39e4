"""Efficiency lab: hardware specs and probing, the analytic roofline model, utilization metrics."""
