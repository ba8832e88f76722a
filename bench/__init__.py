"""afsd's benchmarks. `python -m bench` runs the scale suite and writes docs/bench/ (see bench/__main__.py);
the other scripts here run one benchmark each (`.venv/bin/python bench/<name>.py --help`)."""
