"""Lab equipment for tests and demos: real registries (`registry`) and test images (`images`).

Nothing in here is used by the daemon itself; it builds the world the daemon is tested against.
"""
