"""Test package (a regular package, so site-packages modules named tests cannot shadow it)."""
