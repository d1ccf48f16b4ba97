"""Datasets in the Kaggle BIRDS 525 SPECIES layout: fetch, check, synthesize and load."""
