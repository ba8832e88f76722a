"""The data-path benchmark: every row of issue 14's table, each against its baseline in the same run.

    .venv/bin/python -m bench.datapath [--quick] [--only ROW,...] [--vm auto|yes|no] [--json PATH]

Run as root from the checkout. Rows (modules of this package):
  transport     peer range reads of a whole blob vs raw TCP sendfile -> recv_into (+ transport candidates,
                layerstore CPU per GiB served by transport)
  sequential    cold sequential read through fanotify from a peer vs a local erofs mount (page cache
                dropped); warm vs local warm; layerstore and node CPU per GiB during the cold reads
  random        cold 4 KiB random reads, p50/p99 per miss, afsd vs a minimal C fanotify listener
  ttfb          time to first byte of a small file in a never-seen image a peer holds, 16x larger vs smaller
  task          cold start of `python3 -c 'import ...'` through the proxy (Debian + python3) vs warm
  learned       the same (and a numpy task) on a node that fetches what the cluster learned the task reads
                first, vs warm; and learned bytes fetched but never read vs bytes read
  vm            cold sequential read through fscache vs local erofs, in the lab VM (bench/fscache_bench.py)
Everything runs on loopback with real daemons; everything it starts is stopped and removed at exit
(SIGTERM included). The machine is shared: compare the ratios, which come from one run.
"""
