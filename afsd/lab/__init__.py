"""Lab equipment for tests and demos: real registries and the test images pushed into them.

Nothing in here is used by the daemon itself; it builds the world the daemon is tested against, and
it never imports pytest, afsd's registry client or afsd's converter (it is the independent side of
the tests' comparisons). The data flow, one module a step:

- `layers`: layer entries as Python data (`Entry`, `LayerSpec`) or read from a directory, written
  as tar layer blobs (gzip, zstd or uncompressed);
- `oci_layout`: images (`ImageSpec`) written into and read back from OCI image layouts;
- `facts`: what an image's root filesystem must hold (`ImageFacts`), by the OCI layer rules;
- `skopeo`: layouts pushed to and pulled from registries, checked by digest (`PushedImage`);
- `catalogue`: the ready-made test images (features, multi-arch, implicit parents);
- `debian`: the Debian image from debootstrap, built once into ~/.cache/afsd/images;
- `registry`: a real `docker-registry` process; `daemons`: afsd daemons as child processes.
"""
