"""CrystFEL stream source for streamvi."""
