"""The closed-form family on the embedded world: each method erasing each shape, one at a time.

A view of ``world_erasure.py`` restricted to closed-form methods: target detection, synonym
detection and other-shape accuracy per (method, shape), with the unedited model as baseline.

    python benchmarks/world_closed_form.py [--axis colour] [--seeds 0-31] [--no-multi]
"""

from world_erasure import main

if __name__ == "__main__":
    main(family="closed-form")
