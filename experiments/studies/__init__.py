"""The four studies: the runner that plans, trains, analyses and writes, and each study's analysis."""
