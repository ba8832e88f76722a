"""`afsd snapshotter`: containerd's remote snapshotter backed by the node daemon's lazily mounted layers.

containerd (as a proxy plugin) → `service` (the snapshots gRPC API) → `snapshotter` (containerd's
snapshot semantics) → `store` (sqlite metadata) + `layout` (directories, mounts) + `lazy` (CRI
labels, node daemon leases). docs/containerd.md tells how to configure containerd and Kubernetes.
"""
