"""What the two supervised kernel backends (fanotify/, cachefiles/) share: each runs a detached supervisor
daemon that owns its kernel state, listens on a control socket in a state directory, starts workers, and
outlives the node daemon. Here, written once: every message between their processes (protocol.py), the
node daemon's view of such a backend (backend.py: `SupervisedBackend`) and client (client.py), the state
directory (paths.py), the supervisor's settings and command line (settings.py), workers' counters added
up over restarts (totals.py) and the Prometheus view of a status (metrics.py). What differs (the kernel
interface, the event and request loops, failover) stays in each backend's package.
"""
