"""OCI images from registries: references, platforms, manifests, and the registry client.

Data flow: `parse_reference` -> `RegistryClient.resolve` (manifest, index, config; all verified)
-> `RegistryClient.fetch_blob` per layer -> the erofs converter.
"""

from afsd.oci.client import RegistryClient, ResolvedImage
from afsd.oci.config import Credential, RegistryConfig
from afsd.oci.manifest import Descriptor, ImageConfig, ImageIndex, Manifest, parse_manifest, select_platform
from afsd.oci.platform import Platform, parse_platform
from afsd.oci.reference import ImageReference, parse_reference

__all__ = [
    "Credential", "Descriptor", "ImageConfig", "ImageIndex", "ImageReference", "Manifest", "Platform",
    "RegistryClient", "RegistryConfig", "ResolvedImage", "parse_manifest", "parse_platform", "parse_reference",
    "select_platform",
]
