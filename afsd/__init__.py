"""afsd: a cluster-wide container-image filesystem for agent and RL training clusters.

Registry layers are converted once into erofs blobs, served byte-range by byte-range between
nodes, and mounted by the kernel with misses filled on demand.
"""

__version__ = "0.1.0"
