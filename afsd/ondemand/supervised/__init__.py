"""What the two supervised kernel backends (fanotify/, cachefiles/) share: each runs a detached supervisor
daemon that owns its kernel state, listens on a control socket in a state directory, starts fetch
workers, and outlives the node daemon. Here, written once: the state directory (paths.py), the
supervisor's settings and command line (settings.py), the node daemon's client (client.py) and the
Prometheus view of a supervisor's status (metrics.py). What differs (the kernel interface, the event and
request loops, failover) stays in each backend's package.
"""
