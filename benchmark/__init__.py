"""The benchmark stage: initialisation strategy x label budget x seed, with statistics and a report.

Installed as ``mosmos.benchmark``; it drives both stages and may import them (DESIGN.md, "Layout").
"""
