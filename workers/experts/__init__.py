"""Expert placement for mixture-of-experts models: the placement table, the routing
statistics it is computed from, and the placement policies. Plain Python (no torch,
no ray): the expert-parallel ranks read the table, the policies fill it."""
