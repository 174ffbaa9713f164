"""`yard simulate`: yard's own control plane (scheduler, block manager, dispatch,
migration, P/D and scaling policies) on simulated time, against a trace, with a
step-time model measured by `yard profile` in place of the model (docs/simulate.md)."""
