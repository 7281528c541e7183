"""Still-shot serial crystallography simulator for streamvi."""
