"""Cluster tests: the S3 store and the bus against real SeaweedFS and Valkey processes."""
