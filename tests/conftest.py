"""Suite-wide settings.

Every training in the suite is a tiny model on a 2-core CI machine, often several processes at
once: torch's default intra-op thread pool then makes an epoch ~20x slower. One thread per
process (inherited by every subprocess the tests start) keeps the suite fast and its timings
steady; the code under test never depends on it.
"""

import os

os.environ["OMP_NUM_THREADS"] = "1"
