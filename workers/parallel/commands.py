"""What the leader of a tensor-parallel instance broadcasts to the other ranks: a
tuple whose first item is one of these."""

STEP = "step"  # (STEP, step inputs): run the forward with these inputs
EXPORT = "export"  # (EXPORT, block ids): gather those KV blocks to the leader
IMPORT = "import"  # (IMPORT, block ids, shape): receive KV blocks scattered by the leader
STOP = "stop"  # (STOP,): leave the command loop
