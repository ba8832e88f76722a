"""Network namespaces and the plumbing between them: the one place in afsd that touches netns, veth
pairs, bridges, addresses, routes, nftables and traffic shaping (afslet's `--network bridge`, and the
simulated clusters of the lab, use it).

    namespaces.py  create/delete/list named namespaces (pinned under /run/netns, like `ip netns add`),
                   a process's namespace, and running code inside one (a thread switched with setns)
    links.py       `Links`: rtnetlink (pyroute2) in one namespace — bridges, veth pairs into another
                   namespace, addresses, routes, up/down, per-namespace sysctls
    nft.py         nftables tables, loaded and deleted whole and atomically (`nft -f -`)
    shaping.py     tc hooks: a token-bucket rate limit on an interface
    bridge.py      `BridgeNetwork`: a bridge with a subnet, masquerading to the outside, the host's own
                   services closed to it, ports isolated from each other; namespaces attached by veth

Everything here is blocking (netlink round trips, a thread per namespace switch, `nft`): async callers
run it with `asyncio.to_thread`. Names are the caller's: every global name (namespace, interface, nft
table) must be unique to its owner, so that parallel owners never touch each other's objects, and a
successor can find and remove what a crashed owner left by its prefix.
"""

from afsd.net.bridge import Attachment, BridgeNetwork, BridgeSpec, pick_subnet
from afsd.net.links import Links, open_links
from afsd.net.namespaces import Namespace, create_namespace, delete_namespace, list_namespaces
from afsd.net.nft import NftTable

__all__ = [
    "Attachment", "BridgeNetwork", "BridgeSpec", "Links", "Namespace", "NftTable", "create_namespace",
    "delete_namespace", "list_namespaces", "open_links", "pick_subnet",
]
