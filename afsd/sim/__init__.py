"""A simulated cluster on one host: every node in a network namespace of its own, on one bridge.

Where it sits: lab equipment (like afsd/lab) for the scale tests and benchmarks, and `afsd sim` for
people. Nothing in afsd's daemons imports it. One module a job:

    deadlines.py  every time limit the simulation waits under, in one place (generous: loaded hosts)
    network.py    the bridge, a namespace per member with its own address, tc rate limits (afsd/net)
    census.py     which processes live in the simulation's namespaces, and their memory
    cluster.py    `SimCluster`: registry, discovery replicas and M nodes (layerstore + node daemon)
                  started in their namespaces, health-waited, and torn down with a leftovers check
    burst.py      the burst: every node mounts one never-seen image at once and reads it; timings
    baseline.py   the same burst as plain registry pulls (`docker pull`: download, then unpack)
"""
