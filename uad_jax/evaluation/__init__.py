"""Retrieval evaluation: exact CMC/mAP/mINP, the WHU-MARS protocols, reports, and a model's
features and metrics on an eval split. May import: data, models, sharding, numerics."""
