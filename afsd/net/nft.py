"""nftables tables, each owned whole by one afsd object: loaded atomically from a ruleset text (`nft -f -`,
one transaction: all of it or nothing) and deleted whole.

Several owners' tables coexist at the same hooks: a packet must be accepted by every base chain of every
table, so a table only ever narrows what passes (its `drop`/`reject` is final, its `accept` is not).
That is why each owner keeps to rules about its own interfaces and never sets a dropping policy.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass

from afsd.errors import MissingToolError

NFT_TIMEOUT = 30.0


class NftError(RuntimeError):
    """nft refused a ruleset or a command."""


def nft_binary() -> str:
    found = shutil.which("nft")
    if found is None:
        raise MissingToolError("nft not found: install the Debian package nftables (scripts/setup.sh does)")
    return found


def _nft(*args: str, stdin: str | None = None) -> str:
    result = subprocess.run([nft_binary(), *args], input=stdin, capture_output=True, text=True,
                            timeout=NFT_TIMEOUT)
    if result.returncode != 0:
        message = " ".join(line.strip() for line in result.stderr.splitlines() if line.strip())
        raise NftError(f"nft {' '.join(args)}: {message or f'exit code {result.returncode}'}")
    return result.stdout


@dataclass(frozen=True)
class NftTable:
    family: str  # "inet", "ip", "ip6", "bridge", "netdev", "arp"
    name: str

    def __str__(self) -> str:
        return f"{self.family} {self.name}"

    def load(self, body: str) -> None:
        """Replace the table with one whose contents are `body` (chains and sets, nft syntax), atomically."""
        script = f"table {self}\ndelete table {self}\ntable {self} {{\n{body}\n}}\n"
        _nft("-f", "-", stdin=script)

    def delete(self) -> bool:
        """Remove the table and everything in it; False if there was none."""
        if not self.exists():
            return False
        _nft("delete", "table", self.family, self.name)
        return True

    def exists(self) -> bool:
        return self in tables()

    def listing(self) -> str:
        return _nft("list", "table", self.family, self.name)


def tables(prefix: str = "") -> list[NftTable]:
    """The tables whose names start with `prefix`."""
    listed = json.loads(_nft("-j", "list", "tables") or "{}")
    found = [NftTable(item["table"]["family"], item["table"]["name"])
             for item in listed.get("nftables", []) if "table" in item]
    return [table for table in found if table.name.startswith(prefix)]
