"""speechtrim.data."""
