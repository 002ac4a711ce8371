"""speechtrim.adapters."""
