"""Fusion methods: one file each, registered with harness.registry.method on import."""
