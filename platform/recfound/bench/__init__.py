"""Benchmarks of the platform (``jobs/benchmark.py``): every figure is a ratio of two things measured side by side.

Absolute timings on a shared machine say more about its other tenants than about the code, so each benchmark runs
its candidate and its reference in the same process and the same minutes, interleaved, and reports medians.
"""
