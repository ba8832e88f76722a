"""afsd's benchmarks. `python -m bench` runs the scale suite and writes docs/bench/ (bench/__main__.py);
`python -m bench.datapath` measures the data path; the other scripts here run one benchmark each
(`.venv/bin/python bench/<name>.py --help`)."""
