"""Measuring tools: the benchmark, the LR grid and the search simulator (docs/)."""
