"""Models, training, evaluation, federation (Flower) and privacy evaluation.

Filled by stages 2-4; `fl.data` will be the single door to a site's cohort.
"""
